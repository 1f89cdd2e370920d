"""What ``-d`` names: a dataset id (``501``) or a full nnU-Net dataset name (``Dataset501_Liver``)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DATASET_FOLDER = re.compile(r"Dataset(\d{3})_.+")


class DatasetNotFound(ValueError):
    """``-d`` names no dataset in the folders looked at; the message lists those that exist."""


def is_dataset_reference(value: str) -> bool:
    """An id or a full DatasetXXX_Name; anything else ('Liver') nnU-Net cannot look up."""
    return value.strip().isdigit() or DATASET_FOLDER.fullmatch(value.strip()) is not None


NO_RAW_DATASETS = ("there are none: write the dataset in nnU-Net's raw format first (imagesTr, labelsTr, "
                   "dataset.json), or point the variables at the folders that hold it")
NO_TRAINED_DATASETS = "there are none: train a model first (nnUNetv2_train), or point nnUNet_results at its folder"


def find_dataset(value: str, folder_envs: tuple[str, ...], none_found: str = NO_RAW_DATASETS) -> str:
    """The DatasetXXX_Name that ``value`` names, looked up in the folders of ``folder_envs`` (set environment
    variables); DatasetNotFound saying what exists otherwise. Stricter than nnU-Net's own lookup, which maps a
    mistyped name to whatever dataset has its id."""
    folders = {name: Path(os.environ[name]) for name in folder_envs if os.environ.get(name)}
    known = sorted({p.name for folder in folders.values() if folder.is_dir() for p in folder.iterdir()
                    if p.is_dir() and DATASET_FOLDER.fullmatch(p.name)})
    text = value.strip()
    if text.isdigit():
        matches = [name for name in known if int(DATASET_FOLDER.fullmatch(name).group(1)) == int(text)]
    else:
        matches = [name for name in known if name == text]
    if len(matches) == 1:
        return matches[0]
    where = ", ".join(f"{name}={folder}" for name, folder in folders.items()) or \
        f"{' and '.join(folder_envs)} not set; see `meddinov3 env`"
    if matches:
        raise DatasetNotFound(f"dataset id {text} is ambiguous: {', '.join(matches)} ({where}); pass the full name with -d")
    what = (f"dataset '{text}' not found" if is_dataset_reference(text) else
            f"'{text}' is neither a dataset id (e.g. 501) nor a full dataset name (DatasetXXX_Name)")
    there = f"datasets there: {', '.join(known)}" if known else none_found
    raise DatasetNotFound(f"{what} ({where}); {there}")


def trained_dataset_is_known(command: str, dataset: str) -> bool:
    """False, after saying which trained datasets exist, when ``dataset`` is neither an id nor a
    DatasetXXX_Name ('Liver') and names none of them; True otherwise (nnU-Net resolves the rest)."""
    if is_dataset_reference(dataset):
        return True
    try:
        find_dataset(dataset, ("nnUNet_results",), NO_TRAINED_DATASETS)
    except DatasetNotFound as e:
        print(f"meddinov3 {command}: error: {e}", file=sys.stderr)
        return False
    return True
