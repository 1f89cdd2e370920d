"""MedDINOv3Net3D: the 2D encoder on every slice of a 3D patch, with zero-initialised cross-slice
context. Real torch, the tiny encoder (embed 64, depth 4, 4 heads), no mocks."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_meddinov3.checkpoints import load_encoder_weights
from nnunet_meddinov3.network import MedDINOv3Net
from nnunet_meddinov3.network.slice_context import CONTEXT_KINDS
from nnunet_meddinov3.network.volumetric import NETWORK_3D_CLASS_NAME, MedDINOv3Net3D

CONTEXTS_WITH_MIXING = ("slice_attention", "depth_conv")
TINY = dict(encoder="tiny")
TINY_DIM, TINY_DEPTH = 64, 4
PATCH_PIXELS = 16 * 16
FP32_UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2  # 2^-24


def reordering_tolerance(scale: float, layers: int, longest_sum: int, ulps: int = 4) -> float:
    """How far two fp32 evaluations of the same network may drift when only the GEMMs' batch size
    differs (slices folded into the batch, or not): the kernels may then block, and so add, in
    another order. Reordering an n-term fp32 sum moves it by about sqrt(n) units of roundoff of the
    operands' scale; ``layers`` such sums in sequence add up, and the LayerNorms keep the error
    relative to the output's ``scale``. ``ulps`` covers the constant in "about"."""
    return ulps * FP32_UNIT_ROUNDOFF * math.sqrt(longest_sum) * layers * scale


def tiny_net(context: str, **kwargs) -> MedDINOv3Net3D:
    return MedDINOv3Net3D(1, 3, **TINY, context=context, **kwargs)


def folded(volume: torch.Tensor) -> torch.Tensor:
    return volume.transpose(1, 2).flatten(0, 1)


def perturb_context(net: MedDINOv3Net3D) -> None:
    with torch.no_grad():
        for layer in net.slice_context.output_projections():
            layer.weight.normal_(std=0.05)
            layer.bias.normal_(std=0.05)


@pytest.mark.parametrize("context", CONTEXT_KINDS)
def test_initial_features_are_the_2d_encoders_on_each_slice(context):
    net = tiny_net(context).eval()
    batch, slices = 2, 3
    volume = torch.randn(batch, 1, slices, 32, 48)
    with torch.no_grad():
        features = net.slice_features(folded(volume), slices)
        assert len(features) == len(net.feature_layers)
        for s in range(slices):
            reference = net.encoder.intermediate_tokens(volume[:, :, s], net.feature_layers)
            for ours, ref in zip(features, reference):
                ours = ours.view(batch, slices, *ours.shape[1:])[:, s]
                tol = reordering_tolerance(ref.abs().max().item(), TINY_DEPTH, max(PATCH_PIXELS, 4 * TINY_DIM))
                assert ours.shape == ref.shape
                assert (ours - ref).abs().max().item() <= tol


def test_without_context_the_logits_are_the_2d_networks_slice_by_slice():
    net = tiny_net("none").eval()
    net_2d = MedDINOv3Net(1, 3, **TINY).eval()
    net_2d.load_state_dict(net.state_dict(), strict=True)
    volume = torch.randn(2, 1, 3, 40, 24)
    with torch.no_grad():
        ours = net(volume)
        reference = torch.stack([net_2d(volume[:, :, s]) for s in range(volume.shape[2])], dim=2)
    # encoder blocks, then 4 upsampling stages and the head; the widest sum is the 4 x 64 concatenation
    tol = reordering_tolerance(reference.abs().max().item(), TINY_DEPTH + 5, 4 * TINY_DIM)
    assert (ours - reference).abs().max().item() <= tol


@pytest.mark.parametrize("context", CONTEXT_KINDS)
def test_context_mixes_slices_once_its_output_projection_is_nonzero(context):
    net = tiny_net(context).eval()
    if net.slice_context is not None:
        perturb_context(net)
    volume = torch.randn(1, 1, 3, 32, 32)
    changed = volume.clone()
    changed[:, :, 0] += torch.randn_like(changed[:, :, 0])
    with torch.no_grad():
        before, after = net(volume), net(changed)
    tol = reordering_tolerance(before.abs().max().item(), TINY_DEPTH + 5, 4 * TINY_DIM)
    moved = (after[:, :, 1] - before[:, :, 1]).abs().max().item()  # slice 1, a neighbour of the changed one
    if context == "none":
        assert moved <= tol
    else:
        assert moved > 1000 * tol


@pytest.mark.parametrize("context", CONTEXTS_WITH_MIXING)
def test_zero_initialised_context_gets_gradient_on_the_first_step(context):
    net = tiny_net(context).train()
    volume, target = torch.randn(2, 1, 3, 32, 32), torch.randint(0, 3, (2, 3, 32, 32))
    F.cross_entropy(net(volume), target).backward()
    for name, p in net.slice_context.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in net.slice_context.output_projections():
        assert layer.weight.grad.abs().max() > 0 and layer.bias.grad.abs().max() > 0
    # once the output projection has moved, everything behind it learns too
    net.zero_grad()
    perturb_context(net)
    F.cross_entropy(net(volume), target).backward()
    for name, p in net.slice_context.named_parameters():
        assert p.grad.abs().max() > 0, name


def test_2d_weights_load_into_the_3d_encoder_and_the_3d_state_round_trips(tmp_path):
    net_2d = MedDINOv3Net(1, 3, **TINY)
    net = tiny_net("slice_attention")
    assert net.encoder.state_dict().keys() == net_2d.encoder.state_dict().keys()
    net.encoder.load_state_dict(net_2d.encoder.state_dict(), strict=True)
    torch.save(net_2d.encoder.state_dict(), tmp_path / "encoder.pth")
    assert load_encoder_weights(tiny_net("depth_conv").encoder, tmp_path / "encoder.pth") == "encoder"
    # a whole fine-tuned 2D network starts a 3D one: only the context is new
    missing, unexpected = net.load_state_dict(net_2d.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("slice_context.") for k in missing)

    copy = tiny_net("slice_attention")
    copy.load_state_dict(net.state_dict(), strict=True)
    perturb_context(net)
    copy.load_state_dict(net.state_dict(), strict=True)
    volume = torch.randn(1, 1, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(copy.eval()(volume), net.eval()(volume))  # same machine, same path: bit for bit


@pytest.mark.parametrize("context", CONTEXT_KINDS)
def test_any_in_plane_size_gives_full_resolution_logits(context):
    net = tiny_net(context)
    out = net(torch.randn(2, 1, 3, 40, 24))
    assert out.shape == (2, 3, 3, 40, 24) and out.dtype == torch.float32 and out.is_contiguous()


def test_cpu_autocast_still_returns_float32_logits():
    net = tiny_net("slice_attention", cpu_autocast=True).eval()
    perturb_context(net)
    with torch.no_grad():
        out = net(torch.randn(1, 1, 2, 32, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_clear_errors_for_inputs_it_cannot_take():
    net = tiny_net("slice_attention")
    with pytest.raises(ValueError, match=r"takes \(B, C, S, H, W\) patches.*use MedDINOv3Net / the 2d"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="built for 1 input channel"):
        net(torch.randn(1, 2, 3, 32, 32))
    for context in CONTEXTS_WITH_MIXING:
        with pytest.raises(ValueError, match=r"needs S >= 2.*plan more slices.*context='none'"):
            tiny_net(context)(torch.randn(1, 1, 1, 32, 32))
    assert tiny_net("none")(torch.randn(1, 1, 1, 32, 32)).shape == (1, 3, 1, 32, 32)
    with pytest.raises(ValueError, match="unknown context"):
        tiny_net("full_3d")
    with pytest.raises(ValueError, match="even head width"):
        tiny_net("slice_attention", context_heads=3)


@pytest.mark.parametrize("context", CONTEXTS_WITH_MIXING)
def test_grad_checkpointing_with_stochastic_depth_gives_the_same_gradients(context):
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = tiny_net(context, drop_path_rate=0.3, grad_checkpointing=checkpointing).train()
        perturb_context(net)
        torch.manual_seed(1)  # the same stochastic-depth draws; checkpoint replays them in backward
        net(torch.randn(2, 1, 3, 32, 32)).square().mean().backward()
        gradients.append({k: p.grad for k, p in net.named_parameters()})
    without, with_ = gradients
    assert all(torch.isfinite(g).all() for g in with_.values())
    for name, grad in without.items():
        tol = reordering_tolerance(grad.abs().max().item(), 2 * (TINY_DEPTH + 5), 4 * TINY_DIM)
        assert (with_[name] - grad).abs().max().item() <= tol, name


def test_parameter_names_and_counts():
    assert NETWORK_3D_CLASS_NAME == "nnunet_meddinov3.network.volumetric.MedDINOv3Net3D"
    taps = 4
    with torch.device("meta"):
        counts = {c: MedDINOv3Net3D(1, 3, encoder="vitb16", context=c).context_parameter_count()
                  for c in CONTEXT_KINDS}
    d = 768
    assert counts == {"slice_attention": taps * (4 * d * d + 6 * d),  # norm, qkv, proj
                      "depth_conv": taps * (3 * d * d + d), "none": 0}
    net = tiny_net("slice_attention")
    assert net.context == "slice_attention"
    assert sorted(net.slice_context.after_block) == [str(i) for i in net.feature_layers]
    assert net.context_parameter_count() == sum(p.numel() for n, p in net.named_parameters()
                                                if not n.startswith(("encoder.", "decoder.")))
