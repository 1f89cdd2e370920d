"""2D slices of unlabeled 3D volumes, from a compressed per-slice cache, with a train/test leakage guard.

Volumes come from nnU-Net raw dataset folders (``imagesTr``/``imagesTs``, channel ``_0000`` files),
plain folders of NIfTI files and DICOM series (one volume per series UID), see ``sources.py``. Each
volume is read once, resampled in-plane to the target spacing (linear), and its kept slices (enough
body) are stored one compressed slice at a time (int16 HU for CT, float32 otherwise), of which
``__getitem__`` reads just the one asked for (``slice_store.py``). Slices are taken along the first
array axis of the SimpleITK image (its third index axis, axial for usual CT). The index lists the
kept slices of every volume, what the exclusion list removed, the volumes that could not be used
and why, and a ``manifest_sha256`` identifying the data; how the cache is built, completed and
checked is ``cache_build.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cache_build import INDEX_VERSION, BuildStats, build_cache, index_path, manifest_sha256, settings_folder
from .intensity import MEDDINOV3_CT, IntensityPreset
from .slice_store import read_slice
from .sources import DataError, Exclusion, VolumeSource, find_volumes
from .volume_reader import BadVolume, read_volume

__all__ = ["INDEX_VERSION", "BadVolume", "DataError", "Exclusion", "SliceDataset", "VolumeSource", "find_volumes",
           "manifest_sha256", "read_volume"]


def cache_settings(preset: IntensityPreset, target_spacing: tuple[float, float] | None, body_threshold: float | None,
                   min_body_fraction: float, cache_dtype: str | None) -> dict[str, Any]:
    """The settings that change the cached slices or which are kept: the cache's key."""
    cache_dtype = cache_dtype or ("int16" if preset.kind == "ct" else "float32")
    if cache_dtype not in ("int16", "float32"):
        raise ValueError(f"cache_dtype must be int16 or float32, not {cache_dtype!r}")
    return {
        "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
        "body_threshold": body_threshold,
        "min_body_fraction": min_body_fraction,
        "cache_dtype": cache_dtype,
        "preset": preset.to_dict(),
    }


class SliceDataset:
    """Normalised 2D float32 slices of the volumes under ``roots``.

    roots: nnU-Net raw dataset folders, NIfTI folders, DICOM folders (see :func:`find_volumes`).
    cache_dir: where the cache goes, in a subfolder keyed by the settings below, so configs that
        differ in them can share ``cache_dir``. A second construction re-uses every cached volume
        whose files did not change (size and mtime) and whose cache file is intact, and builds
        only the others.
    preset: intensity normalisation applied in ``__getitem__`` (per-volume statistics, for MRI,
        are computed once from the whole volume and kept in the index).
    target_spacing: in-plane (row, column) spacing in mm to resample to; None keeps the native one.
    body_threshold, min_body_fraction: a slice is kept when at least ``min_body_fraction`` of its
        pixels are above ``body_threshold`` (raw units: HU for CT); ``body_threshold=None`` keeps
        all slices.
    exclude: the leakage guard; excluded volumes are never read.
    cache_dtype: "int16" (rounded HU; the CT default) or "float32" (the default otherwise).
    workers: processes building missing volumes; rank, world_size: this process's share under
        torchrun (every rank calls this; see :func:`build_cache`); verify: check every slice's
        checksum, rebuilding damaged volumes; build_delay_s: debug, a slower build.

    Volumes that cannot be used (unreadable, truncated, NaN/Inf, 4D, RGB) are skipped and listed
    with the reason in ``skipped`` and in the report next to the index.
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
        workers: int = 1,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = False,
        build_delay_s: float = 0.0,
    ):
        self.preset = preset
        self.exclusion = exclude or Exclusion()
        self.cache_config = cache_settings(preset, target_spacing, body_threshold, min_body_fraction, cache_dtype)
        self.cache_dir = settings_folder(Path(cache_dir), self.cache_config)
        # CT intensities are absolute; other presets normalise with statistics of the whole volume
        needs_stats = preset.kind != "ct"
        self.index, self.index_path, self.build_stats = build_cache(
            roots, cache_dir, self.cache_config, self.exclusion, needs_stats, workers=workers, rank=rank,
            world_size=world_size, verify=verify, delay_s=build_delay_s)
        self.volumes: list[dict[str, Any]] = self.index["volumes"]
        self.reused_cache = self.build_stats.built == 0 and self.build_stats.awaited == 0
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
        """The dataset another construction built, from its ``index`` (e.g. sent by the process that
        built it), over the same ``cache_dir``: no volume is scanned or read and nothing is written.
        ``preset`` must be the one the index was built with."""
        if index.get("version") != INDEX_VERSION:
            raise ValueError(f"slice index version {index.get('version')!r}, expected {INDEX_VERSION}")
        if index["config"]["preset"] != preset.to_dict():
            raise ValueError(f"the slice index was built with the intensity preset {index['config']['preset']}, "
                             f"not {preset.to_dict()}")
        dataset = cls.__new__(cls)
        dataset.preset = preset
        exclusion = index["exclusion"]
        dataset.exclusion = Exclusion(frozenset(exclusion["case_ids"]), tuple(exclusion["origins"]))
        dataset.cache_config = index["config"]
        dataset.cache_dir = settings_folder(Path(cache_dir), dataset.cache_config)
        dataset.index_path = index_path(dataset.cache_dir, index["roots"], dataset.exclusion)
        dataset.volumes = index["volumes"]
        dataset.reused_cache = True
        dataset.build_stats = BuildStats()
        dataset.index = index
        dataset._set_slices()
        return dataset

    def _set_slices(self) -> None:
        """The flat item -> (volume, position in its cache file) tables of ``self.volumes``."""
        counts = [len(v["slices"]) for v in self.volumes]
        self._volume_of = np.repeat(np.arange(len(self.volumes), dtype=np.int32), counts)
        self._first_item = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def manifest_sha256(self) -> str:
        return self.index["manifest_sha256"]

    @property
    def excluded(self) -> list[dict[str, str]]:
        return self.index["excluded"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """The volumes that could not be used, with their ``error``."""
        return self.index["skipped"]

    def __len__(self) -> int:
        return len(self._volume_of)

    def _locate(self, i: int) -> tuple[dict[str, Any], int]:
        v = int(self._volume_of[i])
        return self.volumes[v], int(i - self._first_item[v])

    def slice_location(self, i: int) -> tuple[str, int]:
        """(volume key, slice index in the resampled volume) of item ``i``."""
        volume, position = self._locate(i)
        return volume["key"], volume["slices"][position]

    def raw_slice(self, i: int) -> np.ndarray:
        """Item ``i`` as cached (HU for CT), before normalisation."""
        volume, position = self._locate(i)
        return read_slice(str(self.cache_dir / volume["cache_file"]), volume["cache_size"], volume["cache_checksum"],
                          position)

    def __getitem__(self, i: int) -> np.ndarray:
        volume, _ = self._locate(i)
        return self.preset.apply(self.raw_slice(i), volume["stats"])
