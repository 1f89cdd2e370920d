"""The encoder against Meta's reference outputs (tests/fixtures, see shared fixture README).

The fixtures were computed on another CPU, so they are matched within the bounds that
tests/reference_tolerances.py derives, not bit for bit.
"""
import pytest
import torch
from reference_tolerances import assert_bf16_rope_close, assert_fp32_close

from nnunet_meddinov3.checkpoints import build_encoder
from nnunet_meddinov3.network import ENCODER_CONFIGS, default_feature_layers

LAYERS = [0, 1, 2, 3]
TOKEN_KEYS = ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens")


def max_abs_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def expected(fixtures, name, variant):
    return torch.load(fixtures / name, weights_only=True)[variant]


@pytest.mark.parametrize("checkpoint,config,overrides,expected_file,variant,eps", [
    ("official_tiny.pth", "tiny", {}, "expected_official_tiny.pt", "rope_fp32", 1e-5),
    ("meddino_tiny_teacher.pth", "meddinov3_tiny", {}, "expected_meddino_tiny.pt", "rope_bf16", 1e-6),
    ("meddino_tiny_teacher.pth", "meddinov3_tiny", {"rope_dtype": "fp32"}, "expected_meddino_tiny.pt", "rope_fp32", 1e-6),
])
def test_matches_reference(fixtures, reference_inputs, checkpoint, config, overrides, expected_file, variant, eps):
    enc = build_encoder(config, in_channels=3, checkpoint=fixtures / checkpoint, **overrides).eval()
    ref = expected(fixtures, expected_file, variant)
    with torch.no_grad():
        feats = enc.intermediate_features(reference_inputs["x"], LAYERS)
        tokens = enc.forward_tokens(reference_inputs["x"])
    assert [f.shape for f in feats] == [torch.Size([2, 64, 4, 6])] * 4
    # a wrong eps moves the outputs by less than the fp32 bound (see reference_tolerances), so check it here
    norms = [enc.vit.norm] + [n for blk in enc.vit.blocks for n in (blk.norm1, blk.norm2)]
    assert {n.eps for n in norms} == {eps}
    close = assert_bf16_rope_close if variant == "rope_bf16" else assert_fp32_close
    close(feats, ref["intermediates_norm"], "intermediates_norm")
    close([tokens[key] for key in TOKEN_KEYS], [ref[key] for key in TOKEN_KEYS], "tokens")


def test_bf16_rope_is_what_separates_the_meddino_variants(fixtures, reference_inputs):
    # Guards the bf16 emulation: the fp32 model must NOT match the bf16 reference.
    enc = build_encoder("meddinov3_tiny", in_channels=3, checkpoint=fixtures / "meddino_tiny_teacher.pth",
                        rope_dtype="fp32").eval()
    with torch.no_grad():
        feats = enc.intermediate_features(reference_inputs["x"], LAYERS)
    ref = expected(fixtures, "expected_meddino_tiny.pt", "rope_bf16")["intermediates_norm"]
    assert max_abs_diff(feats, ref) > 1e-2
    with pytest.raises(AssertionError, match="mean"):  # the bf16 tolerance still tells fp32 RoPE apart
        assert_bf16_rope_close(feats, ref)


@pytest.mark.parametrize("checkpoint,config,expected_file", [
    ("official_tiny.pth", "tiny", "expected_official_tiny.pt"),
    ("meddino_tiny_teacher.pth", "meddinov3_tiny", "expected_meddino_tiny.pt"),
])
def test_one_channel_equals_gray_repeated_to_rgb(fixtures, reference_inputs, checkpoint, config, expected_file):
    enc = build_encoder(config, in_channels=1, checkpoint=fixtures / checkpoint, rope_dtype="fp32").eval()
    assert enc.vit.patch_embed.proj.weight.shape[1] == 1
    with torch.no_grad():
        feats = enc.intermediate_features(reference_inputs["x1"], LAYERS)
    assert_fp32_close(feats, expected(fixtures, expected_file, "rope_fp32")["intermediates_norm"])


def test_many_channels_with_identical_content_equal_one_channel(fixtures, reference_inputs):
    one = build_encoder("tiny", in_channels=1, checkpoint=fixtures / "official_tiny.pth").eval()
    four = build_encoder("tiny", in_channels=4, checkpoint=fixtures / "official_tiny.pth").eval()
    x1 = reference_inputs["x1"]
    with torch.no_grad():
        a = one.intermediate_features(x1, [3])
        b = four.intermediate_features(x1.repeat(1, 4, 1, 1), [3])
    assert_fp32_close(b, a)  # a 1024-term patch-embedding sum against a 256-term one


def test_named_configs_and_feature_layers():
    assert default_feature_layers(12) == (2, 5, 8, 11)
    assert default_feature_layers(24) == (5, 11, 17, 23)
    assert default_feature_layers(4) == (0, 1, 2, 3)
    # shallower than 4 blocks: each block once (timm returns a repeated index once; round(0.5) = 0)
    assert [default_feature_layers(d) for d in (1, 2, 3)] == [(0,), (0, 1), (0, 1, 2)]
    for name in ("vits16", "vitb16", "vitl16", "tiny", "meddinov3_vitb16"):
        assert name in ENCODER_CONFIGS
    med = ENCODER_CONFIGS["meddinov3_vitb16"]
    assert (med.embed_dim, med.depth, med.num_heads, med.n_storage_tokens) == (768, 12, 12, 4)
    assert (med.qkv_bias, med.norm_eps, med.rope_dtype) == (False, 1e-6, "bf16")
    assert ENCODER_CONFIGS["vitb16"].qkv_bias and ENCODER_CONFIGS["vitb16"].norm_eps == 1e-5


def test_overrides_and_options():
    enc = build_encoder("tiny", qkv_bias=False, drop_path_rate=0.1, n_storage_tokens=2, layer_scale_init=1e-4)
    assert enc.vit.blocks[0].attn.q_bias is None
    assert enc.vit.reg_token.shape == (1, 2, 64)
    assert torch.allclose(enc.vit.blocks[0].gamma_1, torch.full((64,), 1e-4))
    assert [blk.sample_drop_ratio for blk in enc.vit.blocks] == [0.1] * 4
    with pytest.raises(TypeError, match="unknown encoder option"):
        build_encoder("tiny", not_an_option=1)
    with pytest.raises(KeyError, match="unknown encoder 'vitz16'"):
        build_encoder("vitz16")


def test_rope_periods_are_persistent_and_bf16_rounded():
    enc = build_encoder("meddinov3_tiny")
    periods = enc.state_dict()["vit.rope.periods"]
    assert periods.dtype == torch.bfloat16
    assert periods.float().tolist() == [1.0, 3.15625, 10.0, 31.625]


def test_bad_inputs_are_refused_with_a_reason():
    enc = build_encoder("tiny", in_channels=1)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc.intermediate_features(torch.zeros(1, 1, 40, 48), [0])
    with pytest.raises(ValueError, match="expects 1 input channel"):
        enc.intermediate_features(torch.zeros(1, 3, 32, 32), [0])
    with pytest.raises(ValueError, match="out of range"):
        enc.intermediate_features(torch.zeros(1, 1, 32, 32), [4])


def test_gradient_checkpointing_gives_same_gradients(reference_inputs):
    enc = build_encoder("tiny", in_channels=1)
    x = reference_inputs["x1"]
    enc.intermediate_features(x, [1, 3])[1].sum().backward()
    g0 = enc.vit.blocks[0].mlp.fc1.weight.grad.clone()
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    enc.intermediate_features(x, [1, 3])[1].sum().backward()
    assert torch.allclose(g0, enc.vit.blocks[0].mlp.fc1.weight.grad, atol=1e-6)


def _reference_block_step(block, x, rope, ratio):
    """The reference DINOv3 block's training forward, written out: one subset per branch of
    max(int(B * (1 - r)), 1) samples, added back scaled by B / subset."""
    b = x.shape[0]
    subset = max(int(b * (1 - ratio)), 1)
    keep = torch.randperm(b)[:subset]
    attn = block.gamma_1 * block.attn(block.norm1(x[keep]), rope=rope)
    x = x.index_add(0, keep, attn, alpha=b / subset)
    keep = torch.randperm(b)[:subset]
    mlp = block.gamma_2 * block.mlp(block.norm2(x[keep]))
    return x.index_add(0, keep, mlp, alpha=b / subset)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_stochastic_depth_is_the_reference_batch_subset(batch):
    enc = build_encoder("meddinov3_tiny", drop_path_rate=0.2).train()
    assert [blk.sample_drop_ratio for blk in enc.vit.blocks] == [0.2] * enc.depth  # uniform, as the reference
    block = enc.vit.blocks[1]
    x = torch.randn(batch, 2 + 5, 64)
    rope = enc.vit.rope.get_embed(shape=(1, 2))
    torch.manual_seed(3)
    ours = block(x, rope=rope)
    torch.manual_seed(3)
    expected = _reference_block_step(block, x, rope, 0.2)
    torch.testing.assert_close(ours, expected)
    # which samples keep a branch is random; a dropped branch leaves the sample unchanged
    subset = max(int(batch * 0.8), 1)
    unchanged = [(ours[i] == x[i]).all().item() for i in range(batch)]
    assert sum(unchanged) <= batch - subset
    block.eval()
    torch.testing.assert_close(block(x, rope=rope), super(type(block), block).forward(x, rope=rope))


def test_stochastic_depth_skips_the_dropped_samples_flops():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 1, 64, 64)

    def flops(enc):
        with FlopCounterMode(display=False) as counter:
            enc.intermediate_features(x, [enc.depth - 1])
        return counter.get_total_flops()

    torch.manual_seed(0)
    plain = build_encoder("meddinov3_tiny").train()
    dropped = build_encoder("meddinov3_tiny", drop_path_rate=0.2).train()
    # batch 2, r = 0.2: every branch runs on one image, so the blocks cost half
    patch_embed = 2 * 2 * 16 * 16 * 64 * 16
    assert flops(dropped) - patch_embed / 2 == pytest.approx((flops(plain) - patch_embed) / 2 + patch_embed / 2)


def test_stochastic_depth_with_gradient_checkpointing_recomputes_the_same_subsets():
    x = torch.randn(4, 1, 32, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        enc = build_encoder("meddinov3_tiny", drop_path_rate=0.4).train()
        enc.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        enc.intermediate_features(x, [3])[0].square().sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_stochastic_depth_refuses_what_it_cannot_subset():
    enc = build_encoder("meddinov3_tiny", drop_path_rate=0.2).train()
    block = enc.vit.blocks[0]
    x = torch.randn(2, 7, 64)
    with pytest.raises(NotImplementedError, match="no attention mask"):
        block(x, attn_mask=torch.ones(2, 1, 7, 7, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="one RoPE table"):
        block(x, rope=torch.randn(2, 1, 2, 32))
    block.eval()  # inference has no stochastic depth, so nothing to refuse
    rope = enc.vit.rope.get_embed(shape=(1, 2))
    assert block(x, rope=rope, attn_mask=torch.ones(2, 1, 7, 7, dtype=torch.bool)).shape == x.shape
