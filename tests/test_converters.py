"""Every supported source layout -> this project's format -> the same features as the original.

Criterion: relative error < 1e-5 (fp32) between the intermediate features of the encoder built from
the converted file and of the encoder loaded from the original fixture. Layouts that have no
fixture are produced from the fixture state dict by really saving with the foreign library where
it is installed (timm, transformers, torch.distributed.checkpoint), else by the documented mapping.
"""
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from nnunet_meddinov3.checkpoints import (
    LayoutError,
    build_encoder_from_checkpoint,
    detect_layout,
    read_checkpoint,
    read_dcp_backbone,
)
from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint
from nnunet_meddinov3.checkpoints import build_encoder
from nnunet_meddinov3.network.encoder import reference_rope_periods, resolve_encoder_config

LAYERS = [0, 1, 2, 3]


def features(encoder, x, layers=LAYERS):
    with torch.no_grad():
        return encoder.eval().intermediate_features(x, layers)


def rel_err(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def official(fixtures):
    return torch.load(fixtures / "official_tiny.pth", weights_only=True)


@pytest.fixture(scope="module")
def teacher(fixtures):
    return torch.load(fixtures / "meddino_tiny_teacher.pth", weights_only=True)["teacher"]


@pytest.fixture(scope="module")
def x(fixtures):
    return torch.load(fixtures / "inputs.pt", weights_only=True)["x"]


@pytest.fixture(scope="module")
def official_features(fixtures, x):
    return features(build_encoder("tiny", in_channels=3, checkpoint=fixtures / "official_tiny.pth"), x)


@pytest.fixture(scope="module")
def meddino_features(fixtures, x):
    return features(build_encoder("meddinov3_tiny", in_channels=3, checkpoint=fixtures / "meddino_tiny_teacher.pth"), x)


def converted_features(src, tmp_path, x, layers=LAYERS, **kwargs):
    dst = tmp_path / "converted.safetensors"
    convert_checkpoint(src, dst, **kwargs)
    return features(build_encoder_from_checkpoint(dst, in_channels=3), x, layers), read_checkpoint(dst).metadata


# --- Meta's layouts (fixtures) -------------------------------------------------------------------

def test_official_hub_pth(fixtures, tmp_path, x, official_features):
    feats, md = converted_features(fixtures / "official_tiny.pth", tmp_path, x)
    assert rel_err(feats, official_features) < 1e-5
    assert md.source["layout"] == "dinov3_reference" and md.architecture["norm_eps"] == 1e-5
    assert md.architecture["rope_dtype"] == "fp32" and md.intensity["kind"] == "imagenet"


def test_meddinov3_training_checkpoint(fixtures, tmp_path, x, meddino_features):
    feats, md = converted_features(fixtures / "meddino_tiny_teacher.pth", tmp_path, x)
    assert rel_err(feats, meddino_features) < 1e-5
    # the trainer's numerics, which no tensor shape shows, come from the layout and the periods' dtype
    assert (md.architecture["norm_eps"], md.architecture["rope_dtype"], md.architecture["qkv_bias"]) == (1e-6, "bf16", False)


# --- every official size, with and without qkv bias ----------------------------------------------

def random_reference_state(embed_dim, depth, num_heads, qkv_bias, n_storage_tokens=4, seed=0):
    """Random weights in the exact key/shape/dtype layout of Meta's hub files (see the fixture README)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    D = embed_dim
    config = resolve_encoder_config("tiny", embed_dim=D, depth=depth, num_heads=num_heads)
    state = {"cls_token": rand(1, 1, D), "storage_tokens": rand(1, n_storage_tokens, D), "mask_token": rand(1, D),
             "patch_embed.proj.weight": rand(D, 3, 16, 16, scale=1 / math.sqrt(3 * 256)),
             "patch_embed.proj.bias": rand(D, scale=0.2), "rope_embed.periods": reference_rope_periods(config)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + rand(D, scale=0.3), b + "norm1.bias": rand(D, scale=0.2),
                      b + "attn.qkv.weight": rand(3 * D, D, scale=1.5 / math.sqrt(D))})
        if qkv_bias:
            state[b + "attn.qkv.bias"] = rand(3 * D, scale=0.5)
            state[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
        state.update({b + "attn.proj.weight": rand(D, D, scale=1 / math.sqrt(D)), b + "attn.proj.bias": rand(D, scale=0.2),
                      b + "ls1.gamma": rand(D, scale=0.3), b + "norm2.weight": 1 + rand(D, scale=0.3),
                      b + "norm2.bias": rand(D, scale=0.2), b + "mlp.fc1.weight": rand(4 * D, D, scale=1 / math.sqrt(D)),
                      b + "mlp.fc1.bias": rand(4 * D, scale=0.2),
                      b + "mlp.fc2.weight": rand(D, 4 * D, scale=1 / math.sqrt(4 * D)),
                      b + "mlp.fc2.bias": rand(D, scale=0.2), b + "ls2.gamma": rand(D, scale=0.3)})
    state.update({"norm.weight": 1 + rand(D, scale=0.3), "norm.bias": rand(D, scale=0.2)})
    return state


def test_random_reference_state_has_the_hub_layout(official):
    made = random_reference_state(64, 4, 4, qkv_bias=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in made.items()} == \
           {k: (tuple(v.shape), v.dtype) for k, v in official.items()}


@pytest.mark.parametrize("embed_dim,num_heads,qkv_bias", [
    (384, 6, True),    # ViT-S/16
    (768, 12, True),   # ViT-B/16
    (1024, 16, True),  # ViT-L/16
    (384, 6, False),   # no qkv bias keys at all
])
def test_official_layout_every_size_against_timm(tmp_path, embed_dim, num_heads, qkv_bias):
    # Independent reference: timm's own checkpoint_filter_fn + Eva, with the stored periods copied.
    import timm
    from timm.models.eva import checkpoint_filter_fn

    depth = 1  # every block is converted by the same code; one keeps the large sizes fast
    state = random_reference_state(embed_dim, depth, num_heads, qkv_bias, seed=embed_dim)
    src = tmp_path / "hub.pth"
    torch.save(state, src)
    dst = tmp_path / "ours.safetensors"
    convert_checkpoint(src, dst)
    ours = build_encoder_from_checkpoint(dst, in_channels=3).eval()
    assert ours.config.num_heads == num_heads and ours.config.qkv_bias == qkv_bias

    name = "vit_base_patch16_dinov3_qkvb" if qkv_bias else "vit_base_patch16_dinov3"
    ref = timm.create_model(name, pretrained=False, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                            num_classes=0)
    ref.load_state_dict(checkpoint_filter_fn(dict(state), ref), strict=True)
    ref.rope.periods.copy_(state["rope_embed.periods"])
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.eval().forward_intermediates(x, indices=[0], norm=True, output_fmt="NCHW", intermediates_only=True)
    assert rel_err(features(ours, x, [0]), expected) < 1e-5


@pytest.mark.parametrize("model,timm_name,size", [
    ("vits16plus", "vit_small_plus_patch16_dinov3_qkvb", dict(embed_dim=32, num_heads=2)),
    ("vit7b16", "vit_7b_patch16_dinov3", dict(embed_dim=48, num_heads=3)),
])
def test_swiglu_family_against_timm(tmp_path, fixtures, x, model, timm_name, size):
    # Independent of our converter: timm's checkpoint_filter_fn and its own S+ / 7B definitions
    # (SwiGLU, its alignment and mlp_ratio) on the Meta-made tiny files, periods copied.
    import timm
    from timm.models.eva import checkpoint_filter_fn

    state = torch.load(fixtures / "family" / f"{model}.pth", weights_only=True)
    ref = timm.create_model(timm_name, pretrained=False, depth=2, num_classes=0, **size)
    ref.load_state_dict(checkpoint_filter_fn(dict(state), ref), strict=True)
    ref.rope.periods.copy_(state["rope_embed.periods"])
    with torch.no_grad():
        expected = ref.eval().forward_intermediates(x, indices=[0, 1], norm=True, output_fmt="NCHW",
                                                    intermediates_only=True)
    ours = build_encoder(model, in_channels=3, checkpoint=fixtures / "family" / f"{model}.pth", depth=2, **size)
    assert rel_err(features(ours, x, [0, 1]), expected) < 1e-5


# --- dinov3 sharded DCP checkpoints ---------------------------------------------------------------

def save_dcp(state: dict, directory):
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():  # single process, no process group: DCP says so and carries on
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)))


def dinov3_training_dcp(teacher: dict) -> dict:
    """What dinov3's save_checkpoint writes for SSLMetaArch: student, teacher, its model_ema alias, optimizer."""
    model = {}
    for key, value in teacher.items():
        model[f"teacher.{key}"] = value
        model[f"model_ema.{key}"] = value
        model[f"student.{key}"] = value + 0.5 if value.is_floating_point() else value  # must not be picked
    optimizer = {"state": {f"student.{k}": {"exp_avg": torch.zeros_like(v), "step": torch.tensor(99.0)}
                           for k, v in teacher.items() if k.startswith("backbone.blocks.0.")},
                 "param_groups": [{"lr": 1e-4, "params": [f"student.{k}" for k in teacher]}]}
    return {"iteration": 99, "model": model, "optimizer": optimizer}


def test_dcp_training_checkpoint_takes_the_teacher(tmp_path, teacher, x, meddino_features):
    directory = tmp_path / "ckpt" / "99"
    save_dcp(dinov3_training_dcp(teacher), directory)
    backbone, prefix = read_dcp_backbone(directory, max_bytes_per_read=64 << 10)  # many small reads
    assert prefix == "model.teacher.backbone."
    assert detect_layout(backbone) == "dinov3_reference"
    assert all(torch.equal(backbone[k[len("backbone."):]], v) for k, v in teacher.items() if k.startswith("backbone."))
    feats, md = converted_features(directory, tmp_path, x)
    assert rel_err(feats, meddino_features) < 1e-5
    assert md.source["layout"] == "dinov3_dcp" and md.source["kind"] == "dcp_directory"
    assert md.architecture["rope_dtype"] == "bf16"  # the periods were saved as a bf16 buffer


def test_dcp_sharded_eval_checkpoint(tmp_path, teacher, x, meddino_features):
    # do_test(sharded_eval_checkpoint=True) saves model_ema alone: model.backbone.*, model.dino_head.*
    directory = tmp_path / "eval" / "99" / "sharded_teacher_checkpoint"
    save_dcp({"iteration": 99, "model": dict(teacher)}, directory)
    feats, md = converted_features(directory, tmp_path, x)
    assert rel_err(feats, meddino_features) < 1e-5
    assert md.source["dcp_prefix"] == "model.backbone."


def test_dcp_without_a_backbone_is_a_clear_error(tmp_path):
    save_dcp({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other")
    with pytest.raises(LayoutError, match="has no DINOv3 backbone"):
        read_dcp_backbone(tmp_path / "other")


# --- timm ---------------------------------------------------------------------------------------

def test_timm_safetensors_file(tmp_path, official, x, official_features):
    import timm
    from timm.models.eva import checkpoint_filter_fn

    model = timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, embed_dim=64, depth=4, num_heads=4,
                              num_classes=0)
    model.load_state_dict(checkpoint_filter_fn(dict(official), model), strict=True)
    src = tmp_path / "model.safetensors"  # what timm's hub repos hold
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    feats, md = converted_features(src, tmp_path, x)
    assert md.source["layout"] == "timm"
    # timm stores no periods; the converter supplies the reference's bf16-rounded ones = the fixture's
    assert rel_err(feats, official_features) < 1e-5


# --- Hugging Face transformers ------------------------------------------------------------------

def reference_to_hf(state: dict) -> dict:
    """Meta's layout -> transformers' DINOv3ViTModel (the mapping of its convert_dinov3_vit_to_hf.py)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.register_tokens": state["storage_tokens"],
           "embeddings.mask_token": state["mask_token"].unsqueeze(1),
           "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
           "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", f"layer.{i}."
        for n, w in zip("qkv", state[b + "attn.qkv.weight"].chunk(3)):
            out[h + f"attention.{n}_proj.weight"] = w
        if b + "attn.qkv.bias" in state:
            q, _, v = state[b + "attn.qkv.bias"].chunk(3)
            out[h + "attention.q_proj.bias"], out[h + "attention.v_proj.bias"] = q, v
        renames = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj"}
        if b + "mlp.w1.weight" in state:  # SwiGLU: silu(w1 x) * w2 x = act(gate_proj x) * up_proj x
            renames.update({"mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj"})
        else:
            renames.update({"mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"})
        for ref, hf in renames.items():
            for p in ("weight", "bias"):
                out[h + f"{hf}.{p}"] = state[b + f"{ref}.{p}"]
        out[h + "layer_scale1.lambda1"] = state[b + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = state[b + "ls2.gamma"]
    return {k: v.contiguous() for k, v in out.items()}


def test_hf_layout_by_documented_mapping(tmp_path, official, x, official_features):
    src = tmp_path / "model.safetensors"
    save_file(reference_to_hf(official), src)
    feats, md = converted_features(src, tmp_path, x)
    assert md.source["layout"] == "hf_transformers"
    assert rel_err(feats, official_features) < 1e-5


def test_hf_transformers_save_pretrained(tmp_path, official, x, official_features, fixtures):
    transformers = pytest.importorskip("transformers")
    config = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, num_register_tokens=4, layer_norm_eps=1e-5)
    hub = tmp_path / "hub"  # a hub-style folder, loaded the way users load DINOv3 from the hub
    hub.mkdir()
    hf = reference_to_hf(official)
    save_file(hf, hub / "model.safetensors")
    config.save_pretrained(hub)
    model = transformers.DINOv3ViTModel.from_pretrained(hub).eval()
    loaded = model.state_dict()  # transformers 5 names the blocks model.layer.N in memory
    assert all(torch.equal(loaded[k] if k in loaded else loaded[f"model.{k}"], v) for k, v in hf.items())
    # the HF model itself reproduces Meta's reference once given the reference periods
    model.rope_embeddings.inv_freq.copy_(1 / official["rope_embed.periods"])
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    expected = torch.load(fixtures / "expected_official_tiny.pt", weights_only=True)["rope_fp32"]
    assert rel_err([tokens[:, 5:]], [expected["x_norm_patchtokens"]]) < 1e-5

    model.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json, the hub layout
    feats, md = converted_features(tmp_path / "hf" / "model.safetensors", tmp_path, x)
    assert md.source["layout"] == "hf_transformers"
    assert rel_err(feats, official_features) < 1e-5


def test_hf_transformers_gated_mlp(tmp_path, fixtures, x):
    """ViT-S+/H+/7B in transformers' layout: its own gated model, given the tiny S+ fixture, reproduces
    Meta's reference, and our conversion of the file gives what the fixture gives directly."""
    transformers = pytest.importorskip("transformers")
    meta = torch.load(fixtures / "family" / "vits16plus.pth", weights_only=True)
    expected = torch.load(fixtures / "family" / "expected.pt", weights_only=True)["models"]["vits16plus"]
    config = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=2, num_register_tokens=4, layer_norm_eps=1e-5,
                                          use_gated_mlp=True, hidden_act="silu")
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(reference_to_hf(meta), hub / "model.safetensors")
    config.save_pretrained(hub)
    model = transformers.DINOv3ViTModel.from_pretrained(hub).eval()
    model.rope_embeddings.inv_freq.copy_(1 / meta["rope_embed.periods"])
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    assert rel_err([tokens[:, 5:]], [expected["outputs"]["x_norm_patchtokens"]]) < 1e-5

    feats, md = converted_features(hub / "model.safetensors", tmp_path, x, [0, 1])
    assert md.source["layout"] == "hf_transformers" and md.architecture["ffn_layer"] == "swiglu"
    direct = build_encoder("vits16plus", in_channels=3, checkpoint=fixtures / "family" / "vits16plus.pth",
                           embed_dim=32, depth=2, num_heads=2)
    assert rel_err(feats, features(direct, x, [0, 1])) < 1e-5


# --- our own format ----------------------------------------------------------------------------

def test_own_format_round_trip(fixtures, tmp_path, x, meddino_features):
    first = tmp_path / "first.safetensors"
    md1 = convert_checkpoint(fixtures / "meddino_tiny_teacher.pth", first, intensity="ct-meddinov3")
    second = tmp_path / "second.safetensors"
    md2 = convert_checkpoint(first, second)
    assert md2.tensor_sha256 == md1.tensor_sha256
    assert md2.architecture == md1.architecture and md2.intensity == md1.intensity
    assert md2.source["layout"] == "meddinov3" and md2.source["converted_from"] == md1.source
    assert rel_err(features(build_encoder_from_checkpoint(second, in_channels=3), x), meddino_features) < 1e-5


def test_an_unreadable_hf_config_next_to_the_weights_is_reported(tmp_path):
    from nnunet_meddinov3.checkpoints.conversion import hf_config_hints

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring unreadable .*config.json"):
        assert hf_config_hints(weights) == {}
