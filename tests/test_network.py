import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from nnunet_meddinov3.network import ChannelLayerNorm2d, MedDINOv3Net
from nnunet_meddinov3.network.decoders import (
    BottleneckDecoder,
    MultiScaleAggregationDecoder,
    SingleScaleDecoder,
)


@pytest.mark.parametrize("decoder", ["multiscale", "single", "bottleneck"])
@pytest.mark.parametrize("hw", [(64, 64), (40, 70), (17, 33)])
def test_any_input_size_gives_full_resolution_logits(decoder, hw):
    net = MedDINOv3Net(1, 4, encoder="tiny", decoder=decoder)
    out = net(torch.randn(2, 1, *hw))
    assert out.shape == (2, 4, *hw) and out.dtype == torch.float32


def test_padding_does_not_leak_into_the_crop_shape_only():
    net = MedDINOv3Net(1, 2, encoder="tiny").eval()
    x = torch.randn(1, 1, 40, 40)
    padded = F.pad(x, (0, 8, 0, 8))
    with torch.no_grad():
        assert torch.equal(net(x), net(padded)[..., :40, :40])


def test_decoder_widths_follow_the_paper():
    net = MedDINOv3Net(1, 3, encoder="vitb16")
    stack = net.decoder.upsample.stages
    assert [s[0].in_channels for s in stack] == [3072, 1536, 768, 384]
    assert net.decoder.upsample.seg_head.in_channels == 192
    assert net.feature_layers == (2, 5, 8, 11)
    assert 24e6 < sum(p.numel() for p in net.decoder.parameters()) < 26e6
    single = MedDINOv3Net(1, 3, encoder="vitb16", decoder="single")
    assert single.feature_layers == (11,) and single.decoder.upsample.seg_head.in_channels == 48
    bottleneck = MedDINOv3Net(1, 3, encoder="vitb16", decoder="bottleneck")
    assert sum(p.numel() for p in bottleneck.decoder.parameters()) < 4e6


def test_channel_layernorm_equals_layernorm_over_channels():
    x = torch.randn(2, 8, 5, 7)
    norm = ChannelLayerNorm2d(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        mean = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        ref = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight[:, None, None] + norm.bias[:, None, None]
        assert torch.allclose(norm(x), ref, atol=1e-5)


def test_multichannel_input_and_training_step():
    net = MedDINOv3Net(3, 2, encoder="tiny", feature_layers=[1, 3], drop_path_rate=0.1)
    out = net(torch.randn(2, 3, 32, 48))
    out.mean().backward()
    assert net.encoder.vit.patch_embed.proj.weight.grad is not None
    with pytest.raises(ValueError, match="expects 3 input channel"):
        net(torch.randn(1, 1, 32, 32))


def test_invalid_hyperparameters_are_explained():
    with pytest.raises(ValueError, match="no deep supervision"):
        MedDINOv3Net(1, 2, encoder="tiny", deep_supervision=True)
    with pytest.raises(ValueError, match="unknown decoder"):
        MedDINOv3Net(1, 2, encoder="tiny", decoder="unet")
    with pytest.raises(ValueError, match="out of range"):
        MedDINOv3Net(1, 2, encoder="tiny", feature_layers=[7])
    with pytest.raises(ValueError, match="repeat a block"):
        MedDINOv3Net(1, 2, encoder="tiny", feature_layers=[1, 1, 3])


def test_network_is_built_from_hyperparameters_only():
    a, b = MedDINOv3Net(1, 2, encoder="tiny"), MedDINOv3Net(1, 2, encoder="tiny")
    b.load_state_dict(a.state_dict(), strict=True)  # same parameter set whatever the seed


def _modulewise(decoder, maps):
    """The decoder computed the plain way: its conv/norm/GELU modules on NCHW maps, in order."""
    x = torch.cat(list(maps), dim=1) if not isinstance(decoder, SingleScaleDecoder) else maps[-1]
    if isinstance(decoder, BottleneckDecoder):
        x = decoder.project(x)  # nn.Sequential.forward: Conv2d -> ChannelLayerNorm2d -> GELU on NCHW
    for stage in decoder.upsample.stages:
        x = stage(x)  # ConvTranspose2d -> ChannelLayerNorm2d -> GELU on NCHW
    return decoder.upsample.seg_head(x)


@pytest.mark.parametrize("decoder_cls", [MultiScaleAggregationDecoder, SingleScaleDecoder, BottleneckDecoder])
def test_token_gemm_decoder_equals_transposed_convs(decoder_cls):
    """The decoder runs as GEMMs on tokens with one final pixel shuffle; values and gradients
    (of the inputs and every parameter) must equal the transposed-conv computation."""
    torch.manual_seed(0)
    decoder = decoder_cls(embed_dim=32, num_layers=3, num_classes=5).double()
    for p in decoder.parameters():  # non-trivial LayerNorm affine and biases
        torch.nn.init.normal_(p, std=0.5)
    maps = [torch.randn(2, 32, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    tokens = [m.flatten(2).transpose(1, 2) for m in maps]
    fast = decoder.forward_tokens(tokens, (3, 5))
    plain = _modulewise(decoder, maps)
    assert fast.shape == plain.shape == (2, 5, 48, 80)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(decoder(maps), plain, rtol=1e-10, atol=1e-10)  # NCHW entry point

    upstream = torch.randn_like(plain)
    grads_fast = torch.autograd.grad(fast, [*maps, *decoder.parameters()], upstream, allow_unused=True)
    grads_plain = torch.autograd.grad(plain, [*maps, *decoder.parameters()], upstream, allow_unused=True)
    for g_fast, g_plain in zip(grads_fast, grads_plain):
        if g_plain is None:  # SingleScaleDecoder ignores all but the last map
            assert g_fast is None
            continue
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-9, atol=1e-9)


def test_decoder_state_dict_keys_are_the_plain_module_layout():
    """Fine-tuned checkpoints name the decoder's conv modules; the GEMM formulation must not rename them."""
    decoder = BottleneckDecoder(embed_dim=32, num_layers=4, num_classes=3)
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert shapes["project.0.weight"] == (32, 128, 1, 1)
    assert shapes["project.1.weight"] == (32,)
    assert shapes["upsample.stages.0.0.weight"] == (32, 16, 2, 2)  # ConvTranspose2d (C_in, C_out, 2, 2)
    assert shapes["upsample.stages.3.1.bias"] == (2,)
    assert shapes["upsample.seg_head.weight"] == (3, 2, 1, 1)
    assert len(shapes) == 4 + 4 * 4 + 2  # projection, 4 stages (conv + norm, weight + bias each), head


def test_decoder_layernorm_stays_in_the_autocast_dtype():
    """Under bf16 autocast the GEMMs give bf16; the channel LayerNorm must keep it (CUDA autocast
    would run layer_norm in fp32 and double the traffic of the decoder's largest tensors) and stay
    accurate."""
    torch.manual_seed(0)
    norm = ChannelLayerNorm2d(48, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 100, 48) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm.forward_tokens(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), norm.forward_tokens(x), rtol=0.02, atol=0.05)

    net = MedDINOv3Net(1, 3, encoder="tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net.decoder.forward_tokens([torch.randn(1, 4, 64) for _ in range(4)], (2, 2))
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 3, 32, 32)


def test_cpu_autocast_runs_the_network_in_bf16_and_returns_fp32_logits(monkeypatch):
    """Opt-in (MEDDINOV3_CPU_BF16): the network's GPU precision on a CPU. Off by default, as nnU-Net."""
    import nnunet_meddinov3.network.meddinov3_net as module

    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    fp32 = MedDINOv3Net(1, 3, encoder="tiny")
    bf16 = MedDINOv3Net(1, 3, encoder="tiny", cpu_autocast=True)
    bf16.load_state_dict(fp32.state_dict())
    seen = {}

    def record(name):
        def hook(_module, _inputs, output):
            seen[name] = output.dtype
        return hook

    for name, net in (("fp32", fp32), ("bf16", bf16)):
        net.encoder.vit.blocks[0].mlp.fc1.register_forward_hook(record(name))
    x = torch.randn(2, 1, 48, 64)
    reference, low = fp32(x), bf16(x)
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert low.dtype == torch.float32 and low.shape == reference.shape
    torch.testing.assert_close(low, reference, rtol=0.05, atol=0.05)
    low.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)
    # without a precision to run in, there is nothing to autocast to
    assert not MedDINOv3Net(1, 3, encoder="tiny", autocast_dtype=None, cpu_autocast=True).cpu_autocast


def test_cpu_bf16_gradients_match_fp32_within_bf16_precision(monkeypatch):
    """The bf16 path's gradients, not only its outputs, are the fp32 network's to bf16 precision.

    bf16 keeps 8 bits of mantissa (unit roundoff 2^-9, about 0.2 % per rounding; a few percent through
    the network). A parameter's gradient is a sum over every pixel, and where its terms nearly cancel
    (a channel LayerNorm's weight in the last decoder stage) the rounding errors of the terms stay
    while the sum shrinks: its relative error is the per-term error times the cancellation ratio. CPUs
    with AMX-BF16 accumulate the bf16 matmuls differently and reach 0.21 there, other CPUs 0.02-0.06.
    So each parameter is held to 0.5 (a missing or wrongly scaled bf16 gradient path errs by >= 1), and
    the whole network, each parameter's gradient scaled to unit norm, to 0.1 (measured 0.035)."""
    import nnunet_meddinov3.network.meddinov3_net as module

    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    fp32 = MedDINOv3Net(1, 3, encoder="tiny")
    bf16 = MedDINOv3Net(1, 3, encoder="tiny", cpu_autocast=True)
    bf16.load_state_dict(fp32.state_dict())
    x, target = torch.randn(2, 1, 48, 64), torch.randn(2, 3, 48, 64)
    for net in (fp32, bf16):
        ((net(x) - target) ** 2).mean().backward()
    errors = {}
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        scale = p32.grad.norm().item()  # tiny in the encoder (layer scale 1e-5), but relative errors hold
        if scale > 0:
            errors[name] = (p16.grad - p32.grad).norm().item() / scale
    assert len(errors) == len(list(fp32.parameters()))
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.5, f"{worst}: relative gradient error {errors[worst]:.3f}"
    overall = math.sqrt(sum(e**2 for e in errors.values()) / len(errors))
    assert overall < 0.1, f"relative gradient error over the network {overall:.3f}"


def test_cpu_bf16_without_hardware_support_warns(monkeypatch):
    import nnunet_meddinov3.network.meddinov3_net as module

    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: False)
    net = MedDINOv3Net(1, 3, encoder="tiny", cpu_autocast=True)  # built on a GPU machine too: no warning yet
    with pytest.warns(UserWarning, match="no native bf16"):
        net(torch.randn(1, 1, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(1, 1, 32, 32))  # said once
