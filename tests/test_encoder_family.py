"""Every official DINOv3 ViT against Meta's reference at tiny size (tests/fixtures/family, made by
scripts/make_family_fixtures.py from Meta's hub constructor arguments).

S+/L+/H+ have a SwiGLU feed-forward layer, the 7B a SwiGLU64 one and no qkv bias, the SAT ViT-L and
the 7B an untied global/local cls norm (training only), and ``vitl16_untied_cls`` Meta's other
untied norm (``cls_norm`` for the cls and storage tokens). Each file is Meta's hub layout, loaded
strictly with ``build_encoder(name, checkpoint=..., **size)``; the fixtures come from another CPU,
so they are matched within tests/reference_tolerances.py's fp32 bound (1e-5 of the largest value).
"""
import pytest
import torch
from reference_tolerances import assert_fp32_close

from nnunet_meddinov3.checkpoints import (
    CheckpointMismatchError,
    build_encoder,
    build_encoder_from_checkpoint,
    read_checkpoint,
)
from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint
from nnunet_meddinov3.network import ENCODER_CONFIGS

TOKEN_KEYS = ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens")
# fixture -> (our encoder name, overrides besides the size)
MODELS = {
    "vits16plus": ("vits16plus", {}),
    "vitl16plus": ("vitl16plus", {}),
    "vith16plus": ("vith16plus", {}),
    "vit7b16": ("vit7b16", {}),
    "vitl16_sat493m": ("vitl16", {}),
    "vitl16_untied_cls": ("vitl16", {"untie_cls_and_patch_norms": True}),
}


@pytest.fixture(scope="module")
def family(fixtures):
    return torch.load(fixtures / "family" / "expected.pt", weights_only=True)["models"]


def size_of(entry: dict) -> dict:
    kwargs = entry["ctor_kwargs"]
    return {k: kwargs[k] for k in ("embed_dim", "depth", "num_heads")}


def encoder_for(fixtures, family, model: str, **extra):
    name, overrides = MODELS[model]
    return build_encoder(name, in_channels=3, checkpoint=fixtures / "family" / f"{model}.pth",
                         **size_of(family[model]), **overrides, **extra).eval()


def run(encoder, x, layers):
    with torch.no_grad():
        return encoder.intermediate_features(x, layers), encoder.forward_tokens(x)


@pytest.mark.parametrize("model", list(MODELS))
def test_matches_reference(fixtures, reference_inputs, family, model):
    entry = family[model]
    encoder = encoder_for(fixtures, family, model)
    feats, tokens = run(encoder, reference_inputs["x"], entry["layers"])
    ref = entry["outputs"]
    # what the outputs cannot show within the fp32 bound (see tests/test_encoder.py): the eps
    norms = [encoder.vit.norm] + [n for blk in encoder.vit.blocks for n in (blk.norm1, blk.norm2)]
    assert {n.eps for n in norms} == {1e-5}
    assert_fp32_close(feats, ref["intermediates_norm"], "intermediates_norm")
    assert_fp32_close([tokens[k] for k in TOKEN_KEYS], [ref[k] for k in TOKEN_KEYS], "tokens")


@pytest.mark.parametrize("model", list(MODELS))
def test_config_rebuilds_metas_layer_widths(family, model):
    entry = family[model]
    name, overrides = MODELS[model]
    config = ENCODER_CONFIGS[name].replace(**size_of(entry), **overrides)
    kwargs = entry["ctor_kwargs"]
    assert (config.mlp_ratio, config.ffn_layer, config.qkv_bias, config.n_storage_tokens) == \
           (kwargs["ffn_ratio"], kwargs["ffn_layer"], kwargs["qkv_bias"], kwargs["n_storage_tokens"])
    assert config.untie_cls_and_patch_norms == kwargs.get("untie_cls_and_patch_norms", False)
    assert config.ffn_hidden_features == entry["ffn_hidden_features"]


def test_full_size_widths_are_the_hub_models():
    # Meta's published widths: S+ 1536, L+ 4096, H+ 5120 (4 x width), 7B 8192 (2 x width)
    widths = {name: ENCODER_CONFIGS[name].ffn_hidden_features
              for name in ("vits16plus", "vitl16plus", "vith16plus", "vit7b16", "vitb16")}
    assert widths == {"vits16plus": 1536, "vitl16plus": 4096, "vith16plus": 5120, "vit7b16": 8192, "vitb16": 3072}


def test_the_7b_alignment_matters_at_this_size(family):
    # int(48 * 3) * 2 / 3 = 96, rounded up to 64s: 128. A plain SwiGLU would be 96 wide and not load.
    assert family["vit7b16"]["ffn_hidden_features"] == 128
    assert ENCODER_CONFIGS["vit7b16"].replace(embed_dim=48, ffn_layer="swiglu").ffn_hidden_features == 96


def test_untied_cls_norm_is_what_the_cls_tokens_need(fixtures, reference_inputs, family):
    entry = family["vitl16_untied_cls"]
    encoder = encoder_for(fixtures, family, "vitl16_untied_cls")
    with torch.no_grad():
        tokens = encoder.vit.forward_features(reference_inputs["x"])  # timm's path: one norm for all tokens
    # the shared norm gives the patches of the reference but not its cls token
    assert_fp32_close([tokens[:, 5:]], [entry["outputs"]["x_norm_patchtokens"]])
    assert (tokens[:, 0] - entry["outputs"]["x_norm_clstoken"]).abs().max() > 1e-2


@pytest.mark.parametrize("model,name,message", [
    ("vits16plus", "vits16", "mlp.fc1_g"),                  # SwiGLU weights into a GELU MLP
    ("vit7b16", "vitl16plus", "shape mismatch"),            # SwiGLU64 width into SwiGLU
    ("vitl16_untied_cls", "vitl16", "cls_norm"),            # an untied norm the encoder lacks
])
def test_a_wrong_family_member_is_refused_by_name(fixtures, family, model, name, message):
    with pytest.raises(CheckpointMismatchError, match=message):
        build_encoder(name, in_channels=3, checkpoint=fixtures / "family" / f"{model}.pth", **size_of(family[model]))


@pytest.mark.parametrize("model", list(MODELS))
def test_converted_file_records_the_architecture_and_computes_the_same(fixtures, reference_inputs, family, model,
                                                                       tmp_path):
    dst = tmp_path / f"{model}.safetensors"
    convert_checkpoint(fixtures / "family" / f"{model}.pth", dst)
    metadata = read_checkpoint(dst).metadata
    rebuilt = build_encoder_from_checkpoint(dst, in_channels=3).eval()
    direct = encoder_for(fixtures, family, model)
    assert rebuilt.config.ffn_hidden_features == direct.config.ffn_hidden_features
    assert rebuilt.config.untie_cls_and_patch_norms == direct.config.untie_cls_and_patch_norms
    assert metadata.source["layout"] == "dinov3_reference"
    x, layers = reference_inputs["x"], family[model]["layers"]
    (a, ta), (b, tb) = run(rebuilt, x, layers), run(direct, x, layers)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # same machine, same weights: bit for bit
    assert all(torch.equal(ta[k], tb[k]) for k in TOKEN_KEYS)
    # and the named config loads it too: shapes read the tiny 7B as swiglu, ratio 4, the same layer as swiglu64, 3
    name, overrides = MODELS[model]
    build_encoder(name, in_channels=3, checkpoint=dst, **size_of(family[model]), **overrides)


@pytest.mark.parametrize("model,says", [
    ("vits16plus", ["feed-forward: SwiGLU, 128 wide"]),
    ("vit7b16", ["feed-forward: SwiGLU, 128 wide", "local_cls_norm", "not loaded"]),
    ("vitl16_sat493m", ["feed-forward: GELU MLP, 128 wide", "local_cls_norm"]),
    ("vitl16_untied_cls", ["untied cls norm (cls_norm): loaded"]),
])
def test_weights_info_names_the_layout(fixtures, capsys, model, says):
    from nnunet_meddinov3.cli.main import main

    assert main(["weights", "info", str(fixtures / "family" / f"{model}.pth")]) == 0
    out = capsys.readouterr().out
    assert "layout: dinov3_reference (Meta's DINOv3 reference layout" in out
    assert all(s in out for s in says), out


def test_registry_has_every_official_vit(fixtures):
    from nnunet_meddinov3.checkpoints.registry import registry_entries

    encoders = {entry.get("encoder") for entry in registry_entries().values()}
    assert {"vits16", "vits16plus", "vitb16", "vitl16", "vitl16plus", "vith16plus", "vit7b16"} <= encoders
    assert all(entry["encoder"] in ENCODER_CONFIGS for entry in registry_entries().values() if entry.get("encoder"))


def test_full_size_parameter_counts_are_metas():
    """Built on the meta device (no memory): the parameter counts Meta's model card gives, in millions."""
    from nnunet_meddinov3.network import DINOv3Encoder

    published = {"vits16": 21, "vits16plus": 29, "vitb16": 86, "vitl16": 300, "vith16plus": 840, "vit7b16": 6716}
    for name, millions in published.items():
        with torch.device("meta"):
            encoder = DINOv3Encoder(ENCODER_CONFIGS[name], in_channels=3)
        count = sum(p.numel() for p in encoder.parameters()) / 1e6
        assert abs(count - millions) / millions < 0.03, (name, count)  # the card rounds (S: 21.6 -> 21)


def test_the_planner_knows_every_official_vit():
    from nnunet_meddinov3.network.configs import VIT_SIZES
    from nnunet_meddinov3.training.planner import estimate_training_memory_gb

    order = ["vits16", "vits16plus", "vitb16", "vitl16", "vitl16plus", "vith16plus", "vit7b16"]
    assert set(order) <= set(VIT_SIZES)  # `meddinov3 plan_and_preprocess --vit NAME` writes it into the plans
    memory = [estimate_training_memory_gb(name, "multiscale", (896, 896), 2, 3) for name in order]
    assert memory == sorted(memory)
