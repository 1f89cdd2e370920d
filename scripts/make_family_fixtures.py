"""Make tests/fixtures/family/: tiny checkpoints of every official DINOv3 ViT, and Meta's outputs for them.

For each model of Meta's hub (``dinov3/hub/backbones.py`` of facebookresearch/dinov3 at
REFERENCE_COMMIT) this script takes the constructor arguments the hub factory itself passes (it
calls the factory with its builder swapped for one that records them), shrinks only the width,
depth and head count, builds Meta's ``DinoVisionTransformer`` from the checkout you point it at,
fills it with random weights in the hub files' layout, and stores the weights (``NAME.pth``, a
plain state dict as in Meta's ``.pth`` downloads) and the reference's outputs for
``tests/fixtures/inputs.pt`` (``expected.pt``). Nothing of Meta's code is copied here.

    git clone https://github.com/facebookresearch/dinov3 && git -C dinov3 checkout 6876159a11b4df116f30f667f8c9888617df0751
    python scripts/make_family_fixtures.py --reference-root dinov3            # (re)write the files
    python scripts/make_family_fixtures.py --reference-root dinov3 --check    # compare, write nothing

CPU, float32, one thread. tests/fixtures/family/README.md says what each model is and checks.
"""
from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

import torch

from reference_checkout import (
    ENCODER_FILES,
    REFERENCE_COMMIT,
    REFERENCE_URL,
    fixture_main,
    import_reference,
    reference_file_hashes,
)

REFERENCE_FILES = ENCODER_FILES + ("dinov3/hub/backbones.py",)
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "family"
INPUTS = OUT.parent / "inputs.pt"
THREADS = 1

# name -> (hub factory, its extra arguments, tiny size, constructor arguments changed besides the size, seed).
# Widths are chosen so each model's rounding shows: the 7B's SwiGLU64 turns int(48 * 3 * 2 / 3) = 96
# into 128. ``vitl16_untied_cls`` is the ViT-L with the training option ``untie_cls_and_patch_norms``
# (Meta's ssl_default_config.yaml), which no released file uses but our loader accepts.
MODELS = {
    "vits16plus": ("dinov3_vits16plus", {}, dict(embed_dim=32, depth=2, num_heads=2), {}, 101),
    "vitl16plus": ("dinov3_vitl16plus", {}, dict(embed_dim=36, depth=2, num_heads=3), {}, 102),
    "vith16plus": ("dinov3_vith16plus", {}, dict(embed_dim=40, depth=2, num_heads=2), {}, 103),
    "vit7b16": ("dinov3_vit7b16", {}, dict(embed_dim=48, depth=2, num_heads=3), {}, 104),
    "vitl16_sat493m": ("dinov3_vitl16", {"weights": "SAT493M"}, dict(embed_dim=32, depth=2, num_heads=2), {}, 105),
    "vitl16_untied_cls": ("dinov3_vitl16", {}, dict(embed_dim=32, depth=2, num_heads=2),
                          {"untie_cls_and_patch_norms": True}, 106),
}
# the builder's own arguments, not DinoVisionTransformer's
_BUILDER_ONLY = ("pretrained", "weights", "hash", "check_hash", "compact_arch_name", "version")


def hub_kwargs(backbones, factory: str, extra: dict) -> dict:
    """The arguments ``backbones.<factory>`` gives its builder, recorded instead of building."""
    recorded = {}

    def record(**kwargs):
        recorded.update(kwargs)

    real = backbones._make_dinov3_vit
    backbones._make_dinov3_vit = record
    try:
        extra = {k: (backbones.Weights[v] if k == "weights" else v) for k, v in extra.items()}
        getattr(backbones, factory)(pretrained=False, **extra)
    finally:
        backbones._make_dinov3_vit = real
    return {k: v for k, v in recorded.items() if k not in _BUILDER_ONLY}


def random_state(model, seed: int) -> dict:
    """Random values for every parameter and persistent buffer, as tests/fixtures/README.md describes for
    the first fixtures: matrices N(0, 1/fan_in) (qkv 1.5x), biases N(0, 0.2^2), norm weights 1 + 0.3 N(0, 1),
    layer scales |g| in [0.05, 0.6] with random sign, tokens N(0, 1); structural buffers as the reference
    sets them (bias_mask) and the RoPE periods rounded through bf16 as in every released file."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        shape = value.shape
        if key.endswith("bias_mask"):
            d = shape[0] // 3
            new = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        elif key == "rope_embed.periods":
            new = value.to(torch.bfloat16).to(value.dtype)
        elif key.endswith(("ls1.gamma", "ls2.gamma")):
            sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
            new = sign * (0.05 + 0.55 * torch.rand(shape, generator=g))
        elif "norm" in key and key.endswith(".weight"):
            new = 1 + 0.3 * torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            new = 0.2 * torch.randn(shape, generator=g)
        elif key.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            new = torch.randn(shape, generator=g) / math.sqrt(fan_in) * (1.5 if key.endswith("qkv.weight") else 1.0)
        elif key in ("cls_token", "storage_tokens", "mask_token"):
            new = torch.randn(shape, generator=g)
        else:
            raise KeyError(f"no rule for reference key '{key}'")
        state[key] = new.to(value.dtype).contiguous()
    return state


def outputs(model, x: torch.Tensor, layers: list[int]) -> dict:
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        return {
            "intermediates_norm": list(model.get_intermediate_layers(x, n=layers, reshape=True, norm=True)),
            "x_norm_clstoken": features["x_norm_clstoken"],
            "x_storage_tokens": features["x_storage_tokens"],
            "x_norm_patchtokens": features["x_norm_patchtokens"],
        }


def make(root: Path) -> dict[str, dict]:
    """{file name: content} of every fixture file, computed by the reference under ``root``."""
    import_reference(root)
    from dinov3.hub import backbones
    from dinov3.models.vision_transformer import DinoVisionTransformer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    hashes = reference_file_hashes(root, REFERENCE_FILES)
    x = torch.load(INPUTS, weights_only=True)["x"]
    files, expected = {}, {}
    for name, (factory, extra, size, changes, seed) in MODELS.items():
        kwargs = {**hub_kwargs(backbones, factory, extra), **size, **changes}
        model = DinoVisionTransformer(**kwargs)
        state = random_state(model, seed)
        model.load_state_dict(state, strict=True)
        layers = list(range(size["depth"]))
        files[f"{name}.pth"] = state
        expected[name] = {"outputs": outputs(model, x, layers), "layers": layers, "ctor_kwargs": kwargs,
                          "hub_factory": factory, "hub_factory_args": extra, "seed": seed,
                          "ffn_hidden_features": model.blocks[0].mlp.w1.out_features if hasattr(model.blocks[0].mlp, "w1")
                          else model.blocks[0].mlp.fc1.out_features}
    info = {"ref_url": REFERENCE_URL, "ref_commit": REFERENCE_COMMIT, "ref_file_sha256": hashes,
            "torch": str(torch.__version__), "python": platform.python_version(), "threads": THREADS,
            "input": "tests/fixtures/inputs.pt['x']"}
    files["expected.pt"] = {"models": expected, "info": info}
    return files


def main(argv: list[str] | None = None) -> int:
    return fixture_main(argv, __doc__.split("\n\n")[0], "dinov3/hub/backbones.py", REFERENCE_FILES, make, OUT,
                        f"every file in {OUT} is reproduced bit for bit by {REFERENCE_COMMIT}")


if __name__ == "__main__":
    sys.exit(main())
