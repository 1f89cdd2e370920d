"""Synthetic CT volumes for the pretraining data tests, written with SimpleITK (nothing to collect here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_XYZ = (0.8, 0.8, 3.0)
DEPTH, SIZE = 8, 64
EMPTY_SLICES = (0, DEPTH - 1)  # all air: must be skipped by the body mask


def ct_volume(seed: int) -> np.ndarray:
    """(8, 64, 64) int16 HU: air, a ~40 HU body ellipse with brighter blobs on slices 1..6."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE]
    body = ((y - 32) / 24) ** 2 + ((x - 32) / 28) ** 2 <= 1
    volume = np.full((DEPTH, SIZE, SIZE), -1000, dtype=np.int16)
    for k in range(1, DEPTH - 1):
        image = np.where(body, 40, -1000) + rng.normal(0, 10, body.shape) * body
        for _ in range(3):
            cy, cx = rng.integers(20, 44, 2)
            image[(y - cy) ** 2 + (x - cx) ** 2 <= 16] = rng.choice([150, 400, 900])
        volume[k] = np.round(image)
    return volume


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(SPACING_XYZ)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, series_uid: str) -> Path:
    """One file per slice, with the geometry tags the GDCM series reader sorts by."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, plane in enumerate(volume):
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing(SPACING_XYZ[:2])
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT image storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": f"{series_uid}.0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{k * SPACING_XYZ[2]}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(SPACING_XYZ[2]),
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    return folder


def texture_volume(seed: int, size: int = 96, depth: int = 3) -> np.ndarray:
    """(3, 96, 96) int16 'HU': a texture of its own per volume (a grating of random frequency, orientation
    and contrast over soft blobs), so that two crops of one slice share more than two slices of different
    volumes. The phantoms of :func:`ct_volume` (and the demo's) are all alike: self-distillation has no
    image to tell from another there."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    frequency, angle, amplitude = rng.uniform(0.05, 0.4), rng.uniform(0, np.pi), rng.uniform(100, 500)
    base = rng.uniform(-600, 300)
    slices = []
    for _ in range(depth):
        image = base + amplitude * np.sin(frequency * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 6.3))
        for _ in range(rng.integers(2, 6)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 16)
            image += rng.uniform(-400, 400) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        slices.append(image + rng.normal(0, 10, image.shape))
    return np.clip(np.stack(slices), -1000, 1000).round().astype(np.int16)
