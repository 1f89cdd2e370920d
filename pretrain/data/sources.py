"""Where the volumes are: nnU-Net raw datasets, NIfTI trees and DICOM series, and the leakage guard.

A DICOM scan reads a header of every file (GDCM), ~23 minutes for 3.87 M files; the series found
per folder are kept in a series list (``dicom_series/`` in the cache folder) with the folder's
mtime and file count, and a later start re-reads only folders that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from nnunet_meddinov3.durable_files import write_atomically

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# File endings nnU-Net's SimpleITK reader accepts, used when dataset.json gives none.
NNUNET_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
# Files that are never DICOM (the slice cache may live under a data root).
NOT_DICOM = (".json", ".npy", ".slices", ".tmp")


@dataclass(frozen=True)
class VolumeSource:
    """One volume on disk.

    key: unique name, ``<root folder name>/<path inside the root without suffix>`` (for DICOM,
        ``<root folder name>/<series folder>/<series UID>``);
    case_id: nnU-Net case identifier, file name without suffix, or DICOM series UID;
    files: the image file, or the DICOM series files in slice order;
    dicom: whether ``files`` is a DICOM series.
    """

    key: str
    case_id: str
    files: tuple[str, ...]
    dicom: bool = False

    def fingerprint(self) -> dict[str, int]:
        stats = [os.stat(f) for f in self.files]
        return {"file_size": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)}


def _strip_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _nnunet_volumes(root: Path) -> list[VolumeSource]:
    dataset_json = root / "dataset.json"
    suffixes = NNUNET_SUFFIXES
    if dataset_json.is_file():
        suffixes = (json.loads(dataset_json.read_text()).get("file_ending", ".nii.gz"),)
    volumes = []
    for folder in ("imagesTr", "imagesTs"):
        for path in sorted((root / folder).glob("*_0000.*")):
            stem = _strip_suffix(path.name, suffixes)
            if stem is not None:
                case_id = stem[: -len("_0000")]
                volumes.append(VolumeSource(f"{root.name}/{folder}/{case_id}", case_id, (str(path),)))
    return volumes


def _nifti_volumes(root: Path) -> list[VolumeSource]:
    volumes = []
    for path in sorted(root.rglob("*")):
        stem = _strip_suffix(path.name, NIFTI_SUFFIXES)
        if stem is not None and path.is_file():
            relative = path.relative_to(root).parent / stem
            volumes.append(VolumeSource(f"{root.name}/{relative.as_posix()}", stem, (str(path),)))
    return volumes


def _series_list_path(root: Path, series_cache: Path) -> Path:
    return series_cache / f"{root.name}_{hashlib.sha1(str(root).encode()).hexdigest()[:12]}.json"


def _read_series_list(path: Path | None, root: Path) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged list is only a slower scan
    return cached.get("folders", {}) if cached.get("root") == str(root) else {}


def _dicom_volumes(root: Path, series_cache: Path | None = None) -> list[VolumeSource]:
    path = None if series_cache is None else _series_list_path(root, series_cache)
    known = _read_series_list(path, root)
    folders: dict[str, Any] = {}
    volumes = []
    for folder, _, names in sorted(os.walk(root)):
        # Only folders holding something other than NIfTI/JSON/NumPy files can hold a DICOM series.
        if not any(_strip_suffix(n, NIFTI_SUFFIXES + NOT_DICOM) is None for n in names):
            continue
        relative = Path(folder).relative_to(root).as_posix()
        stamp = [os.stat(folder).st_mtime_ns, len(names)]
        entry = known.get(relative)
        if entry is None or entry["stamp"] != stamp:
            series = [[uid, [Path(f).name for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)]]
                      for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)]
            entry = {"stamp": stamp, "series": series}
        folders[relative] = entry
        for uid, files in entry["series"]:
            key = f"{root.name}/{uid}" if relative == "." else f"{root.name}/{relative}/{uid}"
            volumes.append(VolumeSource(key, uid, tuple(os.path.join(folder, f) for f in files), dicom=True))
    if path is not None and folders != known:
        write_atomically(path, lambda f: f.write(json.dumps({"root": str(root), "folders": folders}).encode()),
                         durable=False)
    return volumes


class DataError(ValueError):
    """The data roots give nothing to train on; the message says why and which setting to check."""


def find_volumes(root: str | os.PathLike, series_cache: str | os.PathLike | None = None) -> list[VolumeSource]:
    """Volumes under ``root``: an nnU-Net raw dataset folder (it has ``imagesTr`` or ``imagesTs``),
    or any folder tree of NIfTI files and/or DICOM series (their series lists kept in
    ``series_cache`` when given)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data root '{root}' is not a folder (expected an nnU-Net raw dataset folder or a "
                                f"folder tree of NIfTI files or DICOM series)")
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return _nnunet_volumes(root)
    return _nifti_volumes(root) + _dicom_volumes(root, None if series_cache is None else Path(series_cache))


@dataclass(frozen=True)
class Exclusion:
    """Cases kept out of pretraining, e.g. the test or validation images of a downstream task.

    A volume is excluded when its ``case_id`` or its ``key`` is listed. Matching the bare case id
    excludes a case wherever it appears (also a copy in another folder): the safe side for a
    leakage guard. ``origins`` records where the identifiers came from.
    """

    case_ids: frozenset[str] = frozenset()
    origins: tuple[str, ...] = ()

    @classmethod
    def from_case_ids(cls, case_ids: Iterable[str], origin: str = "case ids") -> Exclusion:
        return cls(frozenset(case_ids), (origin,))

    @classmethod
    def from_nnunet_test_images(cls, dataset_folder: str | os.PathLike) -> Exclusion:
        """Every case of an nnU-Net raw dataset's ``imagesTs`` folder."""
        folder = Path(dataset_folder).resolve()
        ids = {v.case_id for v in _nnunet_volumes(folder) if v.key.startswith(f"{folder.name}/imagesTs/")}
        return cls(frozenset(ids), (f"imagesTs of {folder}",))

    @classmethod
    def from_nnunet_split(cls, splits_file: str | os.PathLike, fold: int) -> Exclusion:
        """The validation cases of ``fold`` in an nnU-Net ``splits_final.json``."""
        splits = json.loads(Path(splits_file).read_text())
        origin = f"validation cases of fold {fold} in {Path(splits_file).resolve()}"
        return cls(frozenset(splits[fold]["val"]), (origin,))

    def __or__(self, other: Exclusion) -> Exclusion:
        return Exclusion(self.case_ids | other.case_ids, self.origins + other.origins)

    def matches(self, volume: VolumeSource) -> bool:
        return volume.case_id in self.case_ids or volume.key in self.case_ids

    def to_dict(self) -> dict[str, Any]:
        return {"case_ids": sorted(self.case_ids), "origins": list(self.origins)}
