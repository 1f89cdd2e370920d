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

import argparse
import hashlib
import math
import platform
import sys
from pathlib import Path

import torch

REFERENCE_COMMIT = "6876159a11b4df116f30f667f8c9888617df0751"
REFERENCE_URL = "https://github.com/facebookresearch/dinov3"
REFERENCE_FILE_SHA256 = {
    "dinov3/models/vision_transformer.py": "1af05405e19bc42188f80bfcb204b87ed1ec72af998e0bbd4658a85d7fae93f2",
    "dinov3/layers/attention.py": "dfc21def6ba17d00cba18ea23a8726e7f1dd5a0dc8e43510852c999a173d37a8",
    "dinov3/layers/block.py": "809a3615ec93019042ab440f31c21d5242186d9e503c67ac0f42a324ceae1950",
    "dinov3/layers/rope_position_encoding.py": "af8ea35acb76d18ad4d53b844d5057bf01472a848375c51d70583a87f044efd1",
    "dinov3/layers/patch_embed.py": "c592c7262779c8e1789ed502aee81bdd55eba4607065f8d04ae95eea683d0ef1",
    "dinov3/layers/layer_scale.py": "f9a10ee763a62136f9e814bfe2f2209c2cb501dfdc5573f858ab01ba9a69c23f",
    "dinov3/layers/ffn_layers.py": "fa2caadb52ff43a7e6888966a00ee07842fed9fd05c68305962cc1577d221fbe",
    "dinov3/hub/backbones.py": "6c9a18aca0b5fcb1fce439213a94a528e072376a6023718e03dbd9fcfaa10deb",
}
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


def reference_file_hashes(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in REFERENCE_FILE_SHA256}


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
    sys.path.insert(0, str(root))
    from dinov3.hub import backbones
    from dinov3.models.vision_transformer import DinoVisionTransformer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    hashes = reference_file_hashes(root)
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


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}[{i}]")


def differences(made: dict, stored: dict) -> list[str]:
    ours, theirs = dict(_tensors(made)), dict(_tensors(stored))
    problems = [f"{k}: only in one of them" for k in sorted(set(ours) ^ set(theirs))]
    problems += [f"{k}: not bitwise equal" for k in sorted(set(ours) & set(theirs))
                 if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-root", required=True, type=Path,
                        help=f"folder containing the 'dinov3' package of {REFERENCE_URL} at {REFERENCE_COMMIT}")
    parser.add_argument("--check", action="store_true", help="compare with the stored files; write nothing")
    parser.add_argument("--allow-other-reference", action="store_true",
                        help="run even if the reference files differ from those of the named commit")
    args = parser.parse_args(argv)
    root = args.reference_root.resolve()
    if not (root / "dinov3" / "hub" / "backbones.py").is_file():
        parser.error(f"{root} has no dinov3/hub/backbones.py; pass the folder holding the 'dinov3' package")
    changed = [n for n, h in reference_file_hashes(root).items() if REFERENCE_FILE_SHA256[n] != h]
    if changed and not args.allow_other_reference:
        parser.error(f"{', '.join(changed)} differ from commit {REFERENCE_COMMIT}; check that commit out "
                     "(or pass --allow-other-reference)")
    made = make(root)
    if args.check:
        problems = [f"{name}{p}" for name, content in made.items()
                    for p in differences(content, torch.load(OUT / name, weights_only=True))]
        print("\n".join(problems) or f"every file in {OUT} is reproduced bit for bit by {REFERENCE_COMMIT}")
        return 1 if problems else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, content in made.items():
        torch.save(content, OUT / name)
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
