"""The timm adapter's assumptions hold for the installed timm (run on every timm the pin allows).

Each test pins down one thing the adapter takes from timm's internals; a timm release that changes
it fails here, by name, rather than as a silent numerical drift somewhere else.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import timm
import torch
from packaging.specifiers import SpecifierSet
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from timm.models.eva import EvaBlock

from nnunet_meddinov3.network import timm_adapter
from nnunet_meddinov3.network.encoder import BatchSubsetStochasticDepthBlock, RoundToDtype, build_encoder

ROOT = Path(__file__).resolve().parents[1]


def test_installed_timm_is_in_the_tested_range_and_pyproject_pins_that_range():
    assert timm.__version__ in SpecifierSet(timm_adapter.TESTED_TIMM)
    dependencies = re.search(r"dependencies = \[(.*?)\n\]", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    pins = re.findall(r'"timm([^"]*)"', dependencies)
    assert pins == [timm_adapter.TESTED_TIMM]


def test_no_private_timm_name_outside_the_adapter():
    """Attribute names with a leading underscore read off timm objects, and class swaps, appear
    only in the adapter. The check is lexical: ``x._name`` where the file imports timm."""
    offenders = []
    for package in ("nnunet_meddinov3", "pretrain"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "timm_adapter.py":
                continue
            text = path.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Attribute) and node.attr in ("_pos_embed", "_create_embed",
                                                                     "_apply_coord_augs", "_compute_periods"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
                if isinstance(node, ast.Attribute) and node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} __class__ assignment")
    assert not offenders, offenders


@pytest.mark.parametrize("config", ["tiny", "meddinov3_tiny"])  # fp32 and bf16 RoPE
def test_the_token_path_is_timms_forward_features_bit_for_bit(config):
    torch.manual_seed(0)
    encoder = build_encoder(config, in_channels=1).eval()
    x = torch.randn(2, 1, 48, 32)
    with torch.no_grad():
        ours = encoder.forward_tokens(x)
        timms = encoder.vit.forward_features(x)
    n_prefix = 1 + encoder.config.n_storage_tokens
    assert torch.equal(ours["x_norm_clstoken"], timms[:, 0])
    assert torch.equal(ours["x_storage_tokens"], timms[:, 1:n_prefix])
    assert torch.equal(ours["x_norm_patchtokens"], timms[:, n_prefix:])


def test_embed_tokens_hook_sees_the_patch_grid_and_changes_only_patches():
    encoder = build_encoder("tiny", in_channels=1).eval()
    x = torch.randn(1, 1, 32, 48)
    seen = []

    def hook(patches):
        seen.append(tuple(patches.shape))
        return torch.zeros_like(patches)

    with torch.no_grad():
        plain, rope = timm_adapter.embed_tokens(encoder.vit, x)
        zeroed, rope_again = timm_adapter.embed_tokens(encoder.vit, x, hook)
    assert seen == [(1, 2, 3, encoder.embed_dim)]
    n_prefix = 1 + encoder.config.n_storage_tokens
    assert plain.shape == (1, n_prefix + 6, encoder.embed_dim)
    assert torch.equal(plain[:, :n_prefix], zeroed[:, :n_prefix]) and not zeroed[:, n_prefix:].any()
    assert torch.equal(rope, rope_again) and rope.shape[0] == 6


def test_block_class_swap_keeps_parameters_and_refuses_foreign_classes():
    encoder = build_encoder("tiny", in_channels=1)
    assert all(type(b) is BatchSubsetStochasticDepthBlock for b in encoder.vit.blocks)
    fresh = build_encoder("tiny", in_channels=1)
    assert fresh.state_dict().keys() == encoder.state_dict().keys()
    with pytest.raises(TypeError, match="EvaBlock"):
        timm_adapter.replace_block_class(encoder.vit, torch.nn.Identity)
    assert issubclass(BatchSubsetStochasticDepthBlock, EvaBlock)
    block = encoder.vit.blocks[0]
    for name in ("attn", "norm1", "norm2", "mlp", "gamma_1", "gamma_2"):  # what the subclass's forward uses
        assert hasattr(block, name), name


def test_qk_norm_is_applied_by_timms_attention():
    """RoundToDtype only works if timm's attention calls q_norm/k_norm: a bf16 RoPE encoder must
    then differ from the same weights with identity norms."""
    torch.manual_seed(0)
    # layer scale 1 so that attention shows in the output (the default 1e-5 hides it at fp32 precision)
    bf16 = build_encoder("meddinov3_tiny", in_channels=1, layer_scale_init=1.0).eval()
    assert all(isinstance(b.attn.q_norm, RoundToDtype) and isinstance(b.attn.k_norm, RoundToDtype)
               for b in bf16.vit.blocks)
    plain = build_encoder("meddinov3_tiny", in_channels=1, layer_scale_init=1.0).eval()
    plain.load_state_dict(bf16.state_dict())
    timm_adapter.replace_qk_norm(plain.vit, torch.nn.Identity)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.equal(bf16.forward_tokens(x)["x_norm_patchtokens"], plain.forward_tokens(x)["x_norm_patchtokens"])


def test_periods_rope_matches_timms_layout_with_timms_periods():
    """With timm's own fp32 periods our ``_create_embed`` gives timm's table: same sin/cos layout."""
    timms = RotaryEmbeddingDinoV3(dim=16, temperature=100.0, normalize_coords="separate", rotate_half=True)
    ours = timm_adapter.PeriodsRotaryEmbedding(dim=16, periods=timms.periods.clone(), dtype=torch.float32,
                                               temperature=100.0, normalize_coords="separate", rotate_half=True)
    assert "periods" in dict(ours.named_buffers()) and "periods" in ours.state_dict()
    torch.testing.assert_close(ours.get_embed(shape=(3, 5)), timms.get_embed(shape=(3, 5)), rtol=1e-6, atol=1e-6)


def test_version_check_takes_the_release_part():
    assert timm_adapter.timm_in_tested_range(timm_adapter.OLDEST_TIMM)
    assert timm_adapter.timm_in_tested_range(timm_adapter.NEWEST_TIMM)
    assert timm_adapter.timm_in_tested_range(timm_adapter.NEWEST_TIMM + "+local")
    assert not timm_adapter.timm_in_tested_range("1.0.19")
    assert not timm_adapter.timm_in_tested_range("1.0.32.dev0") and not timm_adapter.timm_in_tested_range("1.1.0")


@pytest.mark.parametrize("augment", [dict(rescale_coords=2.0), dict(shift_coords=0.3, jitter_coords=1.5, rescale_coords=2.0)])
def test_our_coordinate_augmentation_draws_as_timms(augment):
    """Same draws in the same order as the installed timm's DINOv3 RoPE (and Meta's), so a seed gives
    the same augmented table; the layout test above bounds what the coordinate dtype path changes."""
    timms = RotaryEmbeddingDinoV3(dim=16, temperature=100.0, normalize_coords="separate", rotate_half=True, **augment)
    ours = timm_adapter.PeriodsRotaryEmbedding(dim=16, periods=timms.periods.clone(), dtype=torch.float32,
                                               temperature=100.0, normalize_coords="separate", rotate_half=True,
                                               **augment)
    timms.train(), ours.train()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = timms.get_embed(shape=(3, 5))
        torch.manual_seed(seed)
        torch.testing.assert_close(ours.get_embed(shape=(3, 5)), expected, rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    assert not torch.equal(ours.get_embed(shape=(3, 5)), ours.eval().get_embed(shape=(3, 5)))


def test_periods_survive_moves_casts_and_timms_reset_hooks():
    """timm >= 1.0.31 rebuilds a below-fp32 periods buffer from its formula on ``.to()``, and its reset
    hooks refill it: our periods are the checkpoint's and must stay as loaded, bf16 included."""
    encoder = build_encoder("meddinov3_tiny", in_channels=1)
    rope = encoder.vit.rope
    rope.periods.copy_(torch.tensor([1.0, 3.0, 9.0, 27.0]))  # no formula gives these
    before = rope.periods.clone()
    encoder.to("cpu").train().eval()
    rope.reset_parameters()
    rope.init_non_persistent_buffers()
    assert rope.periods.dtype == torch.bfloat16 and torch.equal(rope.periods, before)
    assert torch.equal(encoder.state_dict()["vit.rope.periods"], before)


def test_ffn_width_is_exact_for_every_named_config():
    from nnunet_meddinov3.network.configs import ENCODER_CONFIGS, FFN_LAYERS
    for name, config in ENCODER_CONFIGS.items():
        kwargs = timm_adapter.ffn_kwargs(config.embed_dim, config.mlp_ratio, config.ffn_hidden_features,
                                         FFN_LAYERS[config.ffn_layer])
        # timm's own arithmetic (eva.py): int(dim * mlp_ratio), then rounded up to swiglu_align_to
        hidden = int(config.embed_dim * kwargs["mlp_ratio"])
        align = kwargs.get("swiglu_align_to", 0)
        assert hidden + (-hidden % align if align else 0) == config.ffn_hidden_features, name
    encoder = build_encoder("vits16plus", in_channels=1, embed_dim=48, num_heads=3, depth=1)
    mlp = encoder.vit.blocks[0].mlp
    assert (mlp.fc1_g.out_features, mlp.fc1_x.out_features, mlp.fc2.in_features) == (192, 192, 192)


def test_coordinate_rescaling_in_training_only():
    rope = build_encoder("tiny", in_channels=1).vit.rope
    rope.set_coordinate_rescaling(2.0)
    assert rope.aug_active and rope.rescale_coords == 2.0
    rope.eval()
    assert torch.equal(rope.get_embed(shape=(4, 4)), rope.get_embed(shape=(4, 4)))
    rope.train()
    torch.manual_seed(0)
    tables = [rope.get_embed(shape=(4, 4)) for _ in range(3)]
    assert not torch.equal(tables[0], tables[1])
    rope.set_coordinate_rescaling(None)
    assert not rope.aug_active
    with pytest.raises(ValueError, match=">= 1"):
        rope.set_coordinate_rescaling(0.5)
