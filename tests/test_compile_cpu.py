"""torch.compile of the whole MedDINOv3Net, on CPU where it works: nnU-Net compiles the network it
trains on CUDA (``nnUNet_compile``), so a graph break or a compiled result that differs would reach
every GPU user."""
import functools

import pytest
import torch

from nnunet_meddinov3.network import MedDINOv3Net


@functools.lru_cache(maxsize=1)
def _compile_unavailable_reason() -> str | None:
    """Inductor on CPU needs a C++ compiler; without one there is nothing to test here."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as e:  # the backend's errors have no common type
        return f"torch.compile does not work on this CPU: {str(e).splitlines()[0][:200]}"
    finally:
        torch._dynamo.reset()
    return None


@pytest.fixture
def compile_works():
    reason = _compile_unavailable_reason()
    if reason:
        pytest.skip(reason)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_whole_network_compiles_as_one_graph(training):
    """Stochastic depth (training) and the input padding included; counted by dynamo, no backend."""
    net = MedDINOv3Net(1, 3, encoder="tiny", decoder="multiscale", drop_path_rate=0.2).train(training)
    explanation = torch._dynamo.explain(net)(torch.randn(2, 1, 40, 56))  # padded to 48 x 64
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_network_matches_eager_outputs_and_gradients(compile_works):
    """The compiled graph (inductor's fused kernels, the decoder's plain path) against the eager
    network (on CPU: the decoder's buffer-reusing path), fp32."""
    torch.manual_seed(0)
    net = MedDINOv3Net(1, 3, encoder="tiny", decoder="multiscale", drop_path_rate=0.0)
    x = torch.randn(2, 1, 64, 64)
    target = torch.randn(2, 3, 64, 64)

    def step(model):
        net.zero_grad(set_to_none=True)
        out = model(x)
        ((out - target) ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    out_eager, grads_eager = step(net)
    out_compiled, grads_compiled = step(torch.compile(net))
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-3, atol=1e-6 * (1 + grad.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")
