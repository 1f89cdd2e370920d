"""2D slices of unlabeled 3D volumes, from a memory-mapped cache, with a train/test leakage guard.

Volumes come from nnU-Net raw dataset folders (``imagesTr``/``imagesTs``, channel ``_0000`` files),
plain folders of NIfTI files and DICOM series (one volume per series UID). Each volume is read
once, resampled in-plane to the target spacing (linear), and saved as one ``.npy`` (int16 HU for
CT, float32 otherwise) that ``__getitem__`` memory-maps, so millions of slices need little RAM.
Slices are taken along the first array axis of the SimpleITK image (its third index axis, axial
for usual CT). The index (``index.json`` next to the cache) lists the kept slices of every volume,
what the exclusion list removed, and a ``manifest_sha256`` identifying the data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import SimpleITK as sitk

from .intensity import MEDDINOV3_CT, IntensityPreset

INDEX_VERSION = 1
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# File endings nnU-Net's SimpleITK reader accepts, used when dataset.json gives none.
NNUNET_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


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


def _dicom_volumes(root: Path) -> list[VolumeSource]:
    volumes = []
    for folder, _, names in sorted(os.walk(root)):
        # Only folders holding something other than NIfTI/JSON/NumPy files can hold a DICOM series.
        if not any(_strip_suffix(n, NIFTI_SUFFIXES + (".json", ".npy")) is None for n in names):
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
            relative = Path(folder).relative_to(root).as_posix()
            key = f"{root.name}/{uid}" if relative == "." else f"{root.name}/{relative}/{uid}"
            volumes.append(VolumeSource(key, uid, files, dicom=True))
    return volumes


class DataError(ValueError):
    """The data roots give nothing to train on; the message says why and which setting to check."""


def find_volumes(root: str | os.PathLike) -> list[VolumeSource]:
    """Volumes under ``root``: an nnU-Net raw dataset folder (it has ``imagesTr`` or ``imagesTs``),
    or any folder tree of NIfTI files and/or DICOM series."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data root '{root}' is not a folder (expected an nnU-Net raw dataset folder or a "
                                f"folder tree of NIfTI files or DICOM series)")
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return _nnunet_volumes(root)
    return _nifti_volumes(root) + _dicom_volumes(root)


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


def read_volume(volume: VolumeSource) -> sitk.Image:
    """A 3D float32 image (DICOM rescale slope/intercept applied, so CT is in HU)."""
    if volume.dicom:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(volume.files))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(volume.files[0])
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{volume.key}: expected a single-channel image")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise ValueError(f"{volume.key}: expected a 3D image, got {image.GetDimension()}D")
    return sitk.Cast(image, sitk.sitkFloat32)


def resample_in_plane(image: sitk.Image, spacing: tuple[float, float]) -> sitk.Image:
    """Linear resampling of the two in-plane axes to ``spacing`` = (row, column) mm = (y, x),
    keeping the slice axis, the direction and the field of view."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array([spacing[1], spacing[0], old_spacing[2]])
    new_size = np.maximum(1, np.round(np.array(image.GetSize()) * old_spacing / new_spacing)).astype(int)
    # Keep the outer pixel edges in place: the first pixel centre moves by half the spacing change.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    air = float(sitk.GetArrayViewFromImage(image).min())
    size = [int(s) for s in new_size]
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), new_spacing.tolist(), image.GetDirection(), air
    )


@functools.lru_cache(maxsize=64)
def _memmap(path: str, mtime_ns: int) -> np.ndarray:
    # Bounded: every open memmap holds a file descriptor. mtime_ns keys out rewritten files.
    return np.load(path, mmap_mode="r")


def _cache_file_name(key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[-80:]
    return f"{readable}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.npy"


def manifest_sha256(volumes: Sequence[dict[str, Any]], exclusion: Exclusion) -> str:
    """sha256 over the sorted (key, file size, shape, spacing, slice count) of the indexed volumes
    and the sorted excluded case ids."""
    rows = sorted(
        [v["key"], v["file_size"], v["original_shape"], [round(s, 6) for s in v["original_spacing"]], len(v["slices"])]
        for v in volumes
    )
    payload = json.dumps({"volumes": rows, "excluded_case_ids": sorted(exclusion.case_ids)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


class SliceDataset:
    """Normalised 2D float32 slices of the volumes under ``roots``.

    roots: nnU-Net raw dataset folders, NIfTI folders, DICOM folders (see :func:`find_volumes`).
    cache_dir: where the per-volume ``.npy`` files (``volumes/``) and ``index.json`` go. A second
        construction with the same settings re-uses every cached volume whose files did not change
        (size and mtime), and reads only new or changed ones.
    preset: intensity normalisation applied in ``__getitem__`` (per-volume statistics, for MRI,
        are computed once from the whole volume and kept in the index).
    target_spacing: in-plane (row, column) spacing in mm to resample to; None keeps the native one.
    body_threshold, min_body_fraction: a slice is kept when at least ``min_body_fraction`` of its
        pixels are above ``body_threshold`` (raw units: HU for CT); ``body_threshold=None`` keeps
        all slices.
    exclude: the leakage guard; excluded volumes are never read.
    cache_dtype: "int16" (rounded HU; the CT default) or "float32" (the default otherwise).

    With several processes (DDP), build the dataset on one rank only and hand its ``index`` to the
    others (:meth:`from_index`): they then neither scan the data nor write the cache.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike],
        cache_dir: str | os.PathLike,
        preset: IntensityPreset = MEDDINOV3_CT,
        target_spacing: tuple[float, float] | None = None,
        body_threshold: float | None = -500.0,
        min_body_fraction: float = 0.05,
        exclude: Exclusion | None = None,
        cache_dtype: str | None = None,
    ):
        self.preset = preset
        self.cache_dir = Path(cache_dir)
        self.index_path = self.cache_dir / "index.json"
        self.exclusion = exclude or Exclusion()
        cache_dtype = cache_dtype or ("int16" if preset.kind == "ct" else "float32")
        if cache_dtype not in ("int16", "float32"):
            raise ValueError(f"cache_dtype must be int16 or float32, not {cache_dtype!r}")
        # Settings that change the cached arrays or the kept slices: any change rebuilds the cache.
        self.cache_config = {
            "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
            "body_threshold": body_threshold,
            "min_body_fraction": min_body_fraction,
            "cache_dtype": cache_dtype,
            "preset": preset.to_dict(),
        }

        sources = [v for root in roots for v in find_volumes(root)]
        where = ", ".join(f"'{Path(r).resolve()}'" for r in roots)
        if not sources:
            raise DataError(f"no volumes found under {where}: expected .nii/.nii.gz files, DICOM series or an nnU-Net "
                            f"raw dataset folder (imagesTr/, imagesTs/)")
        keys = [v.key for v in sources]
        if len(set(keys)) != len(keys):
            raise DataError(f"duplicate volume keys: {sorted({k for k in keys if keys.count(k) > 1})}")

        previous = self._previous_entries()
        self.volumes: list[dict[str, Any]] = []
        excluded = []
        self.reused_cache = True
        for source in sources:
            if self.exclusion.matches(source):
                excluded.append({"key": source.key, "case_id": source.case_id})
                continue
            entry = previous.get(source.key)
            fingerprint = source.fingerprint()
            if not (
                entry is not None
                and entry["files"] == list(source.files)
                and all(entry[k] == v for k, v in fingerprint.items())
                and (self.cache_dir / entry["cache_file"]).is_file()
            ):
                entry = self._cache_volume(source, fingerprint)
                self.reused_cache = False
            self.volumes.append(entry)

        self.index = {
            "version": INDEX_VERSION,
            "config": self.cache_config,
            "roots": [str(Path(r).resolve()) for r in roots],
            "exclusion": self.exclusion.to_dict(),
            "excluded": excluded,
            "n_volumes": len(self.volumes),
            "n_slices": sum(len(v["slices"]) for v in self.volumes),
            "manifest_sha256": manifest_sha256(self.volumes, self.exclusion),
            "volumes": self.volumes,
        }
        self._write_json(self.index_path, self.index)
        self._set_slices()

    def require_slices(self) -> None:
        """Raise :class:`DataError` saying why, when no slice is left to train on."""
        if self.index["n_slices"]:
            return
        config, excluded, kept = self.index["config"], len(self.index["excluded"]), len(self.volumes)
        why = "" if not kept else (
            f", and the other {kept} have no slice" if config["body_threshold"] is None else
            f", and the other {kept} have no slice with at least {config['min_body_fraction']:.0%} of its pixels above "
            f"{config['body_threshold']} (data.body_threshold, data.min_body_fraction)")
        raise DataError(f"nothing to train on: {excluded + kept} volume(s) under "
                        f"{', '.join(repr(r) for r in self.index['roots'])}, {excluded} excluded by the leakage guard "
                        f"(data.exclude_*){why}")

    @classmethod
    def from_index(cls, index: dict[str, Any], cache_dir: str | os.PathLike,
                   preset: IntensityPreset = MEDDINOV3_CT) -> SliceDataset:
        """The dataset another construction built, from its ``index`` (e.g. sent by the rank that
        built it), over the same ``cache_dir``: no volume is scanned or read and nothing is written.
        ``preset`` must be the one the index was built with."""
        if index.get("version") != INDEX_VERSION:
            raise ValueError(f"slice index version {index.get('version')!r}, expected {INDEX_VERSION}")
        if index["config"]["preset"] != preset.to_dict():
            raise ValueError(f"the slice index was built with the intensity preset {index['config']['preset']}, "
                             f"not {preset.to_dict()}")
        dataset = cls.__new__(cls)
        dataset.preset = preset
        dataset.cache_dir = Path(cache_dir)
        dataset.index_path = dataset.cache_dir / "index.json"
        exclusion = index["exclusion"]
        dataset.exclusion = Exclusion(frozenset(exclusion["case_ids"]), tuple(exclusion["origins"]))
        dataset.cache_config = index["config"]
        dataset.volumes = index["volumes"]
        dataset.reused_cache = True
        dataset.index = index
        dataset._set_slices()
        return dataset

    def _set_slices(self) -> None:
        """The flat item -> (volume, slice) tables of ``self.volumes``."""
        counts = [len(v["slices"]) for v in self.volumes]
        self._volume_of = np.repeat(np.arange(len(self.volumes), dtype=np.int32), counts)
        self._slice_of = np.zeros(0, dtype=np.int32)
        if self.volumes:
            self._slice_of = np.concatenate([np.asarray(v["slices"], dtype=np.int32) for v in self.volumes])

    @property
    def manifest_sha256(self) -> str:
        return self.index["manifest_sha256"]

    @property
    def excluded(self) -> list[dict[str, str]]:
        return self.index["excluded"]

    def __len__(self) -> int:
        return len(self._slice_of)

    def slice_location(self, i: int) -> tuple[str, int]:
        """(volume key, slice index in the cached volume) of item ``i``."""
        return self.volumes[self._volume_of[i]]["key"], int(self._slice_of[i])

    def __getitem__(self, i: int) -> np.ndarray:
        volume = self.volumes[self._volume_of[i]]
        path = self.cache_dir / volume["cache_file"]
        array = _memmap(str(path), path.stat().st_mtime_ns)[self._slice_of[i]]
        return self.preset.apply(array, volume["stats"])

    def _previous_entries(self) -> dict[str, dict[str, Any]]:
        if not self.index_path.is_file():
            return {}
        index = json.loads(self.index_path.read_text())
        if index.get("version") != INDEX_VERSION or index.get("config") != self.cache_config:
            return {}
        return {v["key"]: v for v in index["volumes"]}

    def _cache_volume(self, source: VolumeSource, fingerprint: dict[str, int]) -> dict[str, Any]:
        image = read_volume(source)
        original_shape = list(image.GetSize())[::-1]
        original_spacing = list(image.GetSpacing())[::-1]
        if self.cache_config["target_spacing"] is not None:
            image = resample_in_plane(image, self.cache_config["target_spacing"])
        array = sitk.GetArrayFromImage(image)  # (slices, rows, columns)

        threshold = self.cache_config["body_threshold"]
        if threshold is None:
            slices = list(range(array.shape[0]))
        else:
            body_fraction = (array > threshold).mean(axis=(1, 2))
            slices = np.flatnonzero(body_fraction >= self.cache_config["min_body_fraction"]).tolist()

        if self.cache_config["cache_dtype"] == "int16":
            stored = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
        else:
            stored = array.astype(np.float32)
        cache_file = f"volumes/{_cache_file_name(source.key)}"
        path = self.cache_dir / cache_file
        _replace_file(path, lambda f: np.save(f, stored))
        return {
            "key": source.key,
            "case_id": source.case_id,
            "files": list(source.files),
            **fingerprint,
            "original_shape": original_shape,
            "original_spacing": original_spacing,
            "shape": list(stored.shape),
            "spacing": list(image.GetSpacing())[::-1],
            "slices": slices,
            # statistics of the stored (rounded, resampled) volume, so they match what is read
            "stats": self.preset.volume_stats(stored),
            "cache_file": cache_file,
        }

    @staticmethod
    def _write_json(path: Path, data: dict[str, Any]) -> None:
        _replace_file(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def _replace_file(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """(Re)write ``path`` with ``write(binary file)`` through a temporary file in the same folder,
    renamed into place: readers never see a half-written file, and the temporary name is this
    writer's own, so two writers of the same file cannot write into each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
