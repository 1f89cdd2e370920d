"""Non-finite voxels (NaN, +-Inf) in clinical inputs: found, replaced and described for ``meddinov3 predict``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _with_nifti_non_finite(array: np.ndarray, path: Path | None) -> np.ndarray:
    """SimpleITK reads NaN and Inf in NIfTI files as 0 (ITK 5.4), which for CT is water, not background. nibabel
    reads them as stored: put them back, so they are reported and replaced like those of other formats."""
    if path is None or not path.name.endswith((".nii", ".nii.gz")) or not np.issubdtype(array.dtype, np.floating):
        return array
    import nibabel
    stored = np.asarray(nibabel.load(str(path)).dataobj).T  # nibabel indexes (x, y, z), SimpleITK (z, y, x)
    if stored.shape != array.shape or np.isfinite(stored).all():
        return array
    return np.where(np.isfinite(stored), array, stored).astype(array.dtype)


def replace_non_finite(images: list[sitk.Image], files: list[Path] | None = None
                       ) -> tuple[list[sitk.Image], str | None]:
    """The images with NaN and -Inf voxels set to the image's lowest finite value and +Inf to its highest, and a
    message saying how many there were and what they became (None when every voxel is finite). ``files``: the
    images' files, for the NIfTI ones, whose non-finite voxels SimpleITK does not show.

    nnU-Net would carry a NaN through its normalisation into the network: with z-score normalisation the image mean
    becomes NaN and so does the whole image; otherwise every patch holding the voxel comes out NaN, because attention
    mixes all tokens of a patch. Non-finite voxels in exports usually lie outside the reconstructed field of view,
    i.e. background, which the lowest value stands for. An image without a finite voxel cannot be predicted
    (ValueError)."""
    cleaned, found = [], []
    for channel, image in enumerate(images):
        array = _with_nifti_non_finite(sitk.GetArrayViewFromImage(image), files[channel] if files else None)
        if not np.issubdtype(array.dtype, np.floating) or np.isfinite(array).all():
            cleaned.append(image)
            continue
        finite = np.isfinite(array)
        if not finite.any():
            raise ValueError("no finite voxel (all NaN or Inf): nothing to predict from")
        low, high = array[finite].min(), array[finite].max()
        fixed = np.array(array)  # a copy
        nan, pos, neg = np.isnan(fixed), np.isposinf(fixed), np.isneginf(fixed)
        parts = [f"{int(m.sum())} {kind} -> {value:.6g}" for kind, m, value in
                 (("NaN", nan, low), ("-Inf", neg, low), ("+Inf", pos, high)) if m.any()]
        fixed[nan | neg], fixed[pos] = low, high
        out = sitk.GetImageFromArray(fixed)
        out.CopyInformation(image)
        cleaned.append(out)
        found.append(("" if len(images) == 1 else f"channel {channel}: ") + ", ".join(parts))
    if not found:
        return images, None
    return cleaned, (f"non-finite voxels replaced before predicting ({'; '.join(found)}): NaN and -Inf by the "
                     "image's lowest finite value, +Inf by its highest")
