"""``meddinov3 env``: what nnU-Net needs in the environment to find this plugin.

nnU-Net finds external trainers only through ``nnUNet_extTrainer``; this prints the value (and the
other nnU-Net folders' state) so users can put it in their shell profile:

    eval "$(meddinov3 env --export)"
"""
from __future__ import annotations

import os
from pathlib import Path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def ext_trainer_folder() -> str:
    import nnunet_meddinov3.nnunet_ext as ext
    return str(Path(ext.__file__).resolve().parent)


def _is_ours(entry: str) -> bool:
    return bool(entry) and os.path.realpath(entry) == ext_trainer_folder()


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our folder added (kept first, others preserved)."""
    others = [p for p in (current or "").split(os.pathsep) if p and not _is_ours(p)]
    return os.pathsep.join([ext_trainer_folder(), *others])


def add_arguments(parser) -> None:
    parser.add_argument("--export", action="store_true",
                        help="print only shell export lines, for eval \"$(meddinov3 env --export)\"")


def run(args) -> int:
    value = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))
    if args.export:
        print(f"export nnUNet_extTrainer='{value}'")
        return 0
    ok = any(_is_ours(p) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep))
    print(f"nnUNet_extTrainer: {'set' if ok else 'NOT SET'}")
    if not ok:
        print(f"  add to your shell profile:  export nnUNet_extTrainer='{value}'")
        print("  or run:                     eval \"$(meddinov3 env --export)\"")
    for name in NNUNET_FOLDERS:
        val = os.environ.get(name)
        print(f"{name}: {val if val else 'NOT SET (nnU-Net needs it; see the nnU-Net docs on paths)'}")
    from nnunet_meddinov3.checkpoints.registry import CACHE_ENV, WEIGHTS_ENV, cache_dir
    print(f"{CACHE_ENV} (weights cache): {cache_dir()}")
    print(f"{WEIGHTS_ENV}: {os.environ.get(WEIGHTS_ENV) or 'not set (trainer defaults apply)'}")
    return 0 if ok else 1
