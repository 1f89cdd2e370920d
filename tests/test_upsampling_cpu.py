"""The decoder's CPU path (one autograd node, buffers reused across steps) computes what the plain
autograd path computes, step after step."""
import copy

import pytest
import torch

from nnunet_meddinov3.network.decoders import DECODERS

# Wide enough that the last stage keeps 3 channels: a 1-channel LayerNorm outputs its bias whatever comes
# in, so every gradient behind it would be rounding noise.
EMBED = 48


def _decoder(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    decoder = DECODERS[name](embed_dim=EMBED, num_layers=3, num_classes=5).to(dtype)
    for p in decoder.parameters():  # non-trivial LayerNorm affine and biases
        torch.nn.init.normal_(p, std=0.5)
    return decoder


def _plain_twin(decoder):
    twin = copy.deepcopy(decoder)
    twin.upsample.cpu_workspace = False
    return twin


def _step(decoder, tokens, grid, upstream):
    """Forward, backward; returns the logits and every gradient (tokens first)."""
    for p in decoder.parameters():
        p.grad = None
    leaves = [t.detach().requires_grad_() for t in tokens]
    logits = decoder.forward_tokens(leaves, grid)
    (logits * upstream).sum().backward()
    return logits.detach(), [t.grad for t in leaves] + [p.grad for p in decoder.parameters()]


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_cpu_path_equals_plain_path_over_several_steps(name, dtype, tol):
    """Three steps with new inputs and updated weights: a buffer carried over from the last step
    with stale contents, or one handed out twice, would change the outputs or the gradients."""
    fast = _decoder(name, dtype)
    plain = _plain_twin(fast)
    assert fast.upsample._runs_cpu_path(torch.zeros(1, dtype=dtype))  # the parameters need gradients
    grid = (3, 4)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        batch = 2 if step < 2 else 1  # a new batch size drops the held buffers
        tokens = [torch.randn(batch, 12, EMBED, generator=gen, dtype=dtype) for _ in range(3)]
        upstream = torch.randn(batch, 5, 48, 64, generator=gen, dtype=dtype)
        out_fast, grads_fast = _step(fast, tokens, grid, upstream)
        out_plain, grads_plain = _step(plain, tokens, grid, upstream)
        torch.testing.assert_close(out_fast, out_plain, rtol=tol, atol=tol)
        for g_fast, g_plain in zip(grads_fast, grads_plain, strict=True):
            if g_plain is None:  # tokens the decoder does not read (single: all but the last layer's)
                assert g_fast is None
                continue
            # sums over thousands of pixels: the rounding scales with the largest entry
            torch.testing.assert_close(g_fast, g_plain, rtol=tol, atol=tol * (1 + g_plain.abs().max().item()))
        with torch.no_grad():  # an optimiser step, the same on both
            for p_fast, p_plain in zip(fast.parameters(), plain.parameters()):
                p_fast.sub_(0.1 * p_fast.grad)
                p_plain.sub_(0.1 * p_plain.grad)
        # inference between training steps (nnU-Net validates each epoch), at another batch size
        with torch.no_grad():
            small = [t[:1] for t in tokens]
            torch.testing.assert_close(fast.forward_tokens(small, grid), plain.forward_tokens(small, grid),
                                       rtol=tol, atol=tol)


def test_the_second_step_reuses_the_first_steps_buffers():
    """After the first step no new buffers: the second step's forward takes every held buffer, and its
    backward gives the same ones back (gradients included, which live in dead forward buffers)."""
    decoder = _decoder("multiscale", torch.float32)
    grid = (2, 2)
    tokens = [torch.randn(2, 4, EMBED) for _ in range(3)]
    upstream = torch.randn(2, 5, 32, 32)
    workspace = decoder.upsample._workspace

    def held():
        return sorted(t.data_ptr() for t in workspace.held())

    _step(decoder, tokens, grid, upstream)
    after_first = held()
    # per stage: its GEMM weight, GEMM output and output
    assert len(after_first) == 3 * len(decoder.upsample.stages)
    logits = decoder.forward_tokens([t.requires_grad_() for t in tokens], grid)
    assert held() == []
    (logits * upstream).sum().backward()
    assert held() == after_first


def test_two_forwards_in_flight_get_their_own_buffers():
    """Two micro-batches forwarded before either backward must not share intermediates."""
    fast = _decoder("single")
    plain = _plain_twin(fast)
    grid = (2, 3)
    a = [torch.randn(1, 6, EMBED, dtype=torch.float64) for _ in range(3)]
    b = [torch.randn(1, 6, EMBED, dtype=torch.float64) for _ in range(3)]
    up_a, up_b = torch.randn(1, 5, 32, 48, dtype=torch.float64), torch.randn(1, 5, 32, 48, dtype=torch.float64)
    for net in (fast, plain):
        net.zero_grad(set_to_none=True)
        loss = (net.forward_tokens(a, grid) * up_a).sum() + (net.forward_tokens(b, grid) * up_b).sum()
        loss.backward()
    for p_fast, p_plain in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-12, atol=1e-12)


def test_frozen_parts_get_no_gradient():
    fast = _decoder("multiscale")
    plain = _plain_twin(fast)
    for net in (fast, plain):
        for p in net.upsample.stages[0].parameters():
            p.requires_grad_(False)
    tokens = [torch.randn(1, 4, EMBED, dtype=torch.float64) for _ in range(3)]  # no grad for the tokens
    for net in (fast, plain):
        net.forward_tokens(tokens, (2, 2)).square().sum().backward()
    assert all(p.grad is None for p in fast.upsample.stages[0].parameters())
    for p_fast, p_plain in zip(fast.parameters(), plain.parameters()):
        if p_plain.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-12, atol=1e-12)


def test_a_second_backward_says_how_to_get_one():
    decoder = _decoder("single")
    tokens = [torch.randn(1, 4, EMBED, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    loss = decoder.forward_tokens(tokens, (2, 2)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cpu_workspace = False"):
        loss.backward()


def test_inference_autocast_and_bf16_take_the_plain_path():
    decoder = _decoder("single", torch.float32).upsample
    x = torch.zeros(1, 4, EMBED)
    assert decoder._runs_cpu_path(x)
    assert not decoder._runs_cpu_path(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not decoder._runs_cpu_path(x)
    with torch.no_grad():  # holding every stage's buffers between calls would raise inference's peak memory
        assert not decoder._runs_cpu_path(x)
    for p in decoder.parameters():
        p.requires_grad_(False)
    assert not decoder._runs_cpu_path(x)
    assert decoder._runs_cpu_path(x.requires_grad_())
