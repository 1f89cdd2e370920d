"""Regenerate tests/fixtures/expected_*.pt: Meta's DINOv3 reference run on the fixture weights.

The expected tensors that tests/test_encoder.py compares our encoder with are the outputs of Meta's
reference implementation, facebookresearch/dinov3 at commit REFERENCE_COMMIT, for the random-weight
checkpoints ``official_tiny.pth`` / ``meddino_tiny_teacher.pth`` and the input ``inputs.pt`` in the
same folder. This script imports the reference's classes from a checkout you point it at (its code
is never copied into this repository), builds them with the constructor arguments below, loads the
weights strictly and writes the outputs in eval mode under ``torch.no_grad()``.

    git clone https://github.com/facebookresearch/dinov3 && git -C dinov3 checkout 6876159a11b4df116f30f667f8c9888617df0751
    python scripts/make_reference_fixtures.py --reference-root dinov3            # rewrite the two files
    python scripts/make_reference_fixtures.py --reference-root dinov3 --check    # compare, write nothing

``--reference-root`` is the folder that contains the ``dinov3`` package. The reference files used are
identified by sha256 (scripts/reference_checkout.py, also stored in each file's ``info``); a checkout whose
files differ is refused unless ``--allow-other-reference``. CPU, float32, 2 threads (1 gives the
same bits). How the weights and inputs were made, and what each output is, is told in
tests/fixtures/README.md.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

from reference_checkout import (
    ENCODER_FILES,
    REFERENCE_COMMIT,
    fixture_main,
    import_reference,
    reference_file_hashes,
)

REFERENCE_FILES = ENCODER_FILES + ("dinov3/layers/dino_head.py", "dinov3/hub/backbones.py")
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
INTERMEDIATE_INDICES = [0, 1, 2, 3]
THREADS = 2

# The reference's own configurations at the tiny size (embed_dim 64, depth 4, 4 heads; everything
# else as in the reference's factories): the official hub ``dinov3_vitb16`` and MedDINOv3's
# ``vit_base(drop_path_rate=0.2, layerscale_init=1e-5, n_storage_tokens=4, qkv_bias=False, mask_k_bias=True)``.
_COMMON = dict(img_size=224, patch_size=16, in_chans=3, pos_embed_rope_min_period=None,
               pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate",
               pos_embed_rope_shift_coords=None, pos_embed_rope_jitter_coords=None, embed_dim=64, depth=4,
               num_heads=4, ffn_ratio=4, layerscale_init=1e-05, ffn_layer="mlp", ffn_bias=True, proj_bias=True,
               n_storage_tokens=4, mask_k_bias=True, untie_cls_and_patch_norms=False,
               untie_global_and_local_cls_norm=False)
OFFICIAL_KWARGS = dict(_COMMON, pos_embed_rope_base=100, pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32",
                       qkv_bias=True, drop_path_rate=0.0, norm_layer="layernormbf16")
MEDDINO_KWARGS = dict(_COMMON, pos_embed_rope_base=100.0, pos_embed_rope_rescale_coords=None,
                      pos_embed_rope_dtype="bf16", qkv_bias=False, drop_path_rate=0.2, norm_layer="layernorm")
HEAD_KWARGS = dict(in_dim=64, nlayers=3, hidden_dim=32, bottleneck_dim=16, out_dim=32)


def outputs(model, x: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        return {
            "intermediates_norm": list(model.get_intermediate_layers(x, n=INTERMEDIATE_INDICES, reshape=True,
                                                                     norm=True)),
            "intermediates_raw": list(model.get_intermediate_layers(x, n=INTERMEDIATE_INDICES, reshape=True,
                                                                    norm=False)),
            "x_norm_clstoken": features["x_norm_clstoken"],
            "x_storage_tokens": features["x_storage_tokens"],
            "x_norm_patchtokens": features["x_norm_patchtokens"],
        }


def build(vision_transformer, kwargs: dict, state: dict):
    model = vision_transformer(**kwargs)
    model.load_state_dict(state, strict=True)
    return model


def info(kwargs: dict, as_built: str, config: str, hashes: dict, **extra) -> dict:
    return {"ref_root": "facebookresearch/dinov3 (extracted)", "ref_commit": REFERENCE_COMMIT,
            "ref_file_sha256": hashes, "torch": torch.__version__, "python": platform.python_version(),
            "threads": THREADS, "seed": 0, "intermediate_indices": INTERMEDIATE_INDICES, "as_built": as_built,
            "config": config, "ctor_kwargs": kwargs, **extra}


def make(root: Path) -> dict[str, dict]:
    """The two expected files' contents, computed by the reference under ``root``."""
    import_reference(root)
    from dinov3.models.vision_transformer import DinoVisionTransformer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    hashes = reference_file_hashes(root, REFERENCE_FILES)
    x = torch.load(FIXTURES / "inputs.pt", weights_only=True)["x"]

    official = build(DinoVisionTransformer, OFFICIAL_KWARGS, torch.load(FIXTURES / "official_tiny.pth", weights_only=True))
    official_out = outputs(official, x)
    official_info = info(OFFICIAL_KWARGS, "rope_fp32", "official dinov3_vitb16 hub config, tiny size", hashes,
                         norm_eps=official.norm.eps, rope_dtype=str(official.rope_embed.periods.dtype))

    teacher = torch.load(FIXTURES / "meddino_tiny_teacher.pth", weights_only=True)["teacher"]
    # filtered exactly as MedDINOv3's trainer filters its teacher checkpoint
    backbone = {k.replace("backbone.", ""): v for k, v in teacher.items() if "ibot" not in k and "dino_head" not in k}
    fp32_kwargs = dict(MEDDINO_KWARGS, pos_embed_rope_dtype="fp32")
    meddino = {"rope_bf16": outputs(build(DinoVisionTransformer, MEDDINO_KWARGS, backbone), x),
               "rope_fp32": outputs(build(DinoVisionTransformer, fp32_kwargs, backbone), x)}
    meddino_info = info(MEDDINO_KWARGS, "rope_bf16", "MedDINOv3 vit_base(...) config, tiny size", hashes,
                        ctor_kwargs_rope_fp32=fp32_kwargs, head_kwargs=HEAD_KWARGS)
    return {"expected_official_tiny.pt": {"rope_fp32": official_out, "info": official_info},
            "expected_meddino_tiny.pt": {**meddino, "info": meddino_info}}


def main(argv: list[str] | None = None) -> int:
    return fixture_main(argv, __doc__.split("\n\n")[0], "dinov3/models/vision_transformer.py", REFERENCE_FILES,
                        make, FIXTURES, f"both expected files are reproduced bit for bit by {REFERENCE_COMMIT}")


if __name__ == "__main__":
    sys.exit(main())
