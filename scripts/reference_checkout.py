"""The checkout of Meta's reference code that the fixture scripts (scripts/make_*_fixture*.py) run.

Each script imports facebookresearch/dinov3 at REFERENCE_COMMIT from a folder given on its command line
(nothing of Meta's code is copied into this repository). The reference files a script uses are identified by
sha256 (REFERENCE_FILE_SHA256; each script stores the hashes of its files in its fixtures' ``info``), and a
checkout whose files differ is refused unless ``--allow-other-reference``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Callable

import torch

REFERENCE_COMMIT = "6876159a11b4df116f30f667f8c9888617df0751"
REFERENCE_URL = "https://github.com/facebookresearch/dinov3"
REFERENCE_FILE_SHA256 = {
    "dinov3/train/ssl_meta_arch.py": "1b11d7f9f94e6292c3be141ac50ebd10d7357103cb63ce4965b69e3da4ff0781",
    "dinov3/train/multidist_meta_arch.py": "34f04732ad1d9150e120f3eab52b3711883d5bf8e4048bab83e0dc0816073c8c",
    "dinov3/train/train.py": "1f979df26be1f1a7344d5a75716a95470b86b3fdd0294a5c69abe48a85ec576e",
    "dinov3/train/cosine_lr_scheduler.py": "671d3a7c16fcc7b73a6ff76d702664ccfe141895d89bc9d0137bee6a3ce4b02c",
    "dinov3/train/param_groups.py": "b3d638888c03a63b7bc585c2f886ca4cedb6ba24f4e9511bfa3840f97b90716f",
    "dinov3/loss/dino_clstoken_loss.py": "2ee114321a3c38b4e9426bb200f3c13de4672e6531a7a3e30c4b399881529166",
    "dinov3/loss/ibot_patch_loss.py": "bfb9e358aaf872949ce3150c22599f89f7dbdafd0137652b7e1944a9853f40d4",
    "dinov3/loss/koleo_loss.py": "942ccd42b06105c95c04d62ca2105d9e5bf22987b509c19fb81a645fac5a8cf6",
    "dinov3/models/__init__.py": "3e993968b5ffe2be00eaea8b16cd52f8d165ac683b9035d3ceb769cffdd72914",
    "dinov3/models/vision_transformer.py": "1af05405e19bc42188f80bfcb204b87ed1ec72af998e0bbd4658a85d7fae93f2",
    "dinov3/layers/attention.py": "dfc21def6ba17d00cba18ea23a8726e7f1dd5a0dc8e43510852c999a173d37a8",
    "dinov3/layers/block.py": "809a3615ec93019042ab440f31c21d5242186d9e503c67ac0f42a324ceae1950",
    "dinov3/layers/rope_position_encoding.py": "af8ea35acb76d18ad4d53b844d5057bf01472a848375c51d70583a87f044efd1",
    "dinov3/layers/patch_embed.py": "c592c7262779c8e1789ed502aee81bdd55eba4607065f8d04ae95eea683d0ef1",
    "dinov3/layers/layer_scale.py": "f9a10ee763a62136f9e814bfe2f2209c2cb501dfdc5573f858ab01ba9a69c23f",
    "dinov3/layers/ffn_layers.py": "fa2caadb52ff43a7e6888966a00ee07842fed9fd05c68305962cc1577d221fbe",
    "dinov3/layers/dino_head.py": "cd7a83f00ac449f962484bad0f2959be477781e57943508428d32ff88f41fe33",
    "dinov3/configs/ssl_default_config.yaml": "ab32485a2cc80712ab85ef4fe12113eea667902c9cf1f22859ad743a0758c41b",
    "dinov3/hub/backbones.py": "6c9a18aca0b5fcb1fce439213a94a528e072376a6023718e03dbd9fcfaa10deb",
}
# The encoder's own files, used by every script.
ENCODER_FILES = (
    "dinov3/models/vision_transformer.py",
    "dinov3/layers/attention.py",
    "dinov3/layers/block.py",
    "dinov3/layers/rope_position_encoding.py",
    "dinov3/layers/patch_embed.py",
    "dinov3/layers/layer_scale.py",
    "dinov3/layers/ffn_layers.py",
)


def reference_file_hashes(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each named file under the checkout ``root``."""
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in names}


def changed_reference_files(root: Path, names: tuple[str, ...]) -> list[str]:
    """The named files whose content differs from REFERENCE_COMMIT's."""
    return [n for n, h in reference_file_hashes(root, names).items() if REFERENCE_FILE_SHA256[n] != h]


def import_reference(root: Path) -> None:
    """Make the checkout's ``dinov3`` package importable."""
    sys.path.insert(0, str(root))


def parse_reference_arguments(description: str, marker: str, names: tuple[str, ...],
                              argv: list[str] | None) -> argparse.Namespace:
    """The command line of a fixture script: ``--reference-root`` (resolved, checked to hold ``marker`` and the
    named files of REFERENCE_COMMIT), ``--check`` and ``--allow-other-reference``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reference-root", required=True, type=Path,
                        help=f"folder containing the 'dinov3' package of {REFERENCE_URL} at {REFERENCE_COMMIT}")
    parser.add_argument("--check", action="store_true", help="compare with the stored files; write nothing")
    parser.add_argument("--allow-other-reference", action="store_true",
                        help="run even if the reference files differ from those of the named commit")
    args = parser.parse_args(argv)
    args.reference_root = root = args.reference_root.resolve()
    if not (root / marker).is_file():
        parser.error(f"{root} has no {marker}; pass the folder holding the 'dinov3' package")
    changed = changed_reference_files(root, names)
    if changed and not args.allow_other_reference:
        parser.error(f"{', '.join(changed)} differ from commit {REFERENCE_COMMIT}; check that commit out "
                     "(or pass --allow-other-reference)")
    return args


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}[{i}]")


def tensor_differences(made: dict, stored: dict) -> list[str]:
    """Where the tensors of two nested dicts/lists differ: a path only in one, or not bitwise equal."""
    ours, theirs = dict(_tensors(made)), dict(_tensors(stored))
    problems = [f"{k}: only in one of them" for k in sorted(set(ours) ^ set(theirs))]
    problems += [f"{k}: not bitwise equal" for k in sorted(set(ours) & set(theirs))
                 if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    return problems


def fixture_main(argv: list[str] | None, description: str, marker: str, names: tuple[str, ...],
                 make: Callable[[Path], dict[str, dict]], folder: Path, reproduced: str) -> int:
    """A fixture script's command: check the checkout, ``make`` the files from it, then write them to ``folder``
    or, with ``--check``, compare them with those stored there (``reproduced``: what to say when equal)."""
    args = parse_reference_arguments(description, marker, names, argv)
    made = make(args.reference_root)
    if args.check:
        return check_stored_files(made, folder, reproduced)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in made.items():
        torch.save(content, folder / name)
        print(f"wrote {folder / name} ({(folder / name).stat().st_size:,} bytes)")
    return 0


def check_stored_files(made: dict[str, dict], folder: Path, reproduced: str) -> int:
    """``--check``: print the differences between the files made and those stored in ``folder`` (or
    ``reproduced`` when there are none); the exit status, 1 when any."""
    problems = [f"{name}{p}" for name, content in made.items()
                for p in tensor_differences(content, torch.load(folder / name, weights_only=True))]
    print("\n".join(problems) or reproduced)
    return 1 if problems else 0
