"""The MedDINOv3 reference implementation (github ricklisz/MedDINOv3), imported from a checkout the
user points at (``--reference-repo``; its code is never copied here) and built as its trainer
``meddinov3_base_primus_multiscale_Trainer`` builds it (the building is in
:mod:`~nnunet_meddinov3.benchmark.factories`). Standard library only, so that the CLI can check a
``--reference-repo`` without importing torch."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

# The MedDINOv3 reference (github ricklisz/MedDINOv3). Its ``dinov3`` package lives at
# REFERENCE_PACKAGE_PARENT inside the repository; our decoder name -> its network class.
REFERENCE_URL = "https://github.com/ricklisz/MedDINOv3"
REFERENCE_PACKAGE_PARENT = os.path.join("nnUNet", "nnunetv2", "training", "nnUNetTrainer", "dinov3")
REFERENCE_MODULES = (os.path.join("dinov3", "models", "vision_transformer.py"),
                     os.path.join("dinov3", "models", "primus.py"))
REFERENCE_DECODERS = {"multiscale": "Primus_Multiscale", "single": "Primus"}
# meddinov3_base_primus_multiscale_Trainer: the ViT's constructor arguments besides E/D/H, the Primus
# patch size, and its AdamW (two groups split on 'dino_encoder' in the parameter name).
REFERENCE_PATCH_SIZE = 16
REFERENCE_VIT_KWARGS = dict(patch_size=REFERENCE_PATCH_SIZE, ffn_ratio=4, drop_path_rate=0.2, layerscale_init=1e-5,
                            n_storage_tokens=4, qkv_bias=False, mask_k_bias=True)
REFERENCE_ENCODER_PARAM = "dino_encoder"
REFERENCE_LRS = dict(encoder_lr=3e-5, decoder_lr=3e-4)
REFERENCE_WEIGHT_DECAY = 0.05
REFERENCE_ADAMW_BETAS = (0.9, 0.98)
REFERENCE_EFFECTIVE_DTYPE_CUDA = "fp16+GradScaler"

class ReferenceRepoError(ValueError):
    """The path given for the MedDINOv3 reference holds neither of its layouts."""


def resolve_reference_repo(path: str | os.PathLike) -> str:
    """The absolute folder that directly contains the reference's ``dinov3`` package.

    ``path`` is either the MedDINOv3 repository root (the package is under REFERENCE_PACKAGE_PARENT)
    or that folder itself; raises ReferenceRepoError naming both expected places otherwise.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(path)))
    candidates = (os.path.join(root, REFERENCE_PACKAGE_PARENT), root)
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, module)) for module in REFERENCE_MODULES):
            return candidate
    expected = " or ".join(os.path.join(c, REFERENCE_MODULES[0].rsplit(os.sep, 1)[0], "{vision_transformer,primus}.py")
                           for c in candidates)
    raise ReferenceRepoError(
        f"no MedDINOv3 reference at {root}: expected {expected} (the path may be the MedDINOv3 repository root "
        f"or the folder that directly contains its 'dinov3' package); get the code with "
        f"'git clone {REFERENCE_URL}'")


def reference_commit(path: str | os.PathLike) -> str | None:
    """The git commit of a reference checkout, when it is one (for the report)."""
    try:
        proc = subprocess.run(["git", "-C", os.fspath(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def import_reference(reference_repo: str) -> dict:
    """Import the reference's ViT and Primus classes from its checkout (worker side: this puts the
    checkout's ``dinov3`` package first on ``sys.path`` for the rest of the process)."""
    root = resolve_reference_repo(reference_repo)
    if root not in sys.path:
        sys.path.insert(0, root)
    vision_transformer = importlib.import_module("dinov3.models.vision_transformer")
    primus = importlib.import_module("dinov3.models.primus")
    origin = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(vision_transformer.__file__))))
    if os.path.realpath(origin) != os.path.realpath(root):
        raise ImportError(f"'dinov3' was imported from {origin}, not from the reference checkout {root} "
                          f"(another 'dinov3' package is installed or already imported)")
    classes = {"DinoVisionTransformer": vision_transformer.DinoVisionTransformer}
    classes.update({name: getattr(primus, name) for name in REFERENCE_DECODERS.values()})
    return classes


def reference_parameter_groups(model) -> list[dict]:
    """The reference trainer's AdamW groups: parameters named *dino_encoder* at the encoder LR, the
    rest at the decoder LR, both with its weight decay."""
    encoder = [p for n, p in model.named_parameters() if REFERENCE_ENCODER_PARAM in n]
    decoder = [p for n, p in model.named_parameters() if REFERENCE_ENCODER_PARAM not in n]
    return [{"params": encoder, "lr": REFERENCE_LRS["encoder_lr"], "weight_decay": REFERENCE_WEIGHT_DECAY},
            {"params": decoder, "lr": REFERENCE_LRS["decoder_lr"], "weight_decay": REFERENCE_WEIGHT_DECAY}]
