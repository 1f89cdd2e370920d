"""Normalised surface distance (surface Dice): the geometry, and NSD per trainer, case and class from nnU-Net's
validation predictions and reference segmentations."""
from __future__ import annotations

import os

import numpy as np

from nnunet_meddinov3.evaluation.folders import (
    CaseResult,
    CompareError,
    TrainerResults,
    first_existing,
    parse_class_key,
)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face-neighbour outside it (the image border counts as outside)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    return mask & ~binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), border_value=0)


def normalized_surface_distance(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing, tolerance_mm: float) -> float:
    """Normalised surface distance (surface Dice, Nikolov et al. 2021) of two binary masks, 2D or 3D.

    NSD = (#pred surface voxels within ``tolerance_mm`` of the ref surface + #ref surface voxels within
    ``tolerance_mm`` of the pred surface) / (#pred surface voxels + #ref surface voxels), distances measured with
    ``spacing`` (mm per voxel along each array axis) and "within" meaning <= tolerance. Surface voxels are mask voxels
    with a face-neighbour outside the mask, each counted once (as MONAI's ``compute_surface_dice``; DeepMind's
    surface-distance weights surface elements by area instead, which differs slightly on anisotropic grids).

    Axes of length 1 are dropped first, so a single-slice volume (nnU-Net's 2D NIfTI) is measured in 2D instead of
    being all surface. Returns NaN if both masks are empty and 0.0 if exactly one is.
    """
    from scipy.ndimage import distance_transform_edt

    pred_mask, ref_mask = np.asarray(pred_mask, dtype=bool), np.asarray(ref_mask, dtype=bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} != reference shape {ref_mask.shape}")
    if len(spacing) != pred_mask.ndim:
        raise ValueError(f"{len(spacing)} spacings for a {pred_mask.ndim}D mask")
    kept_axes = [axis for axis, size in enumerate(pred_mask.shape) if size > 1]
    pred_mask = pred_mask.reshape([pred_mask.shape[a] for a in kept_axes])
    ref_mask = ref_mask.reshape(pred_mask.shape)
    spacing = [float(spacing[a]) for a in kept_axes]

    pred_any, ref_any = pred_mask.any(), ref_mask.any()
    if not pred_any and not ref_any:
        return float("nan")
    if not pred_any or not ref_any:
        return 0.0

    # Distance transforms over a whole CT volume are slow; the bounding box of both masks plus one background voxel
    # gives the same surfaces (erosion sees the same neighbours) and holds every surface voxel, so distances match.
    union = np.argwhere(pred_mask | ref_mask)
    low = np.maximum(union.min(axis=0) - 1, 0)
    high = np.minimum(union.max(axis=0) + 2, pred_mask.shape)
    crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    pred_surface, ref_surface = _surface(pred_mask[crop]), _surface(ref_mask[crop])

    # distance_transform_edt measures to the nearest zero, so invert the surface to measure to it.
    distance_to_ref = distance_transform_edt(~ref_surface, sampling=spacing)
    distance_to_pred = distance_transform_edt(~pred_surface, sampling=spacing)
    pred_close = np.count_nonzero(distance_to_ref[pred_surface] <= tolerance_mm)
    ref_close = np.count_nonzero(distance_to_pred[ref_surface] <= tolerance_mm)
    return (pred_close + ref_close) / (np.count_nonzero(pred_surface) + np.count_nonzero(ref_surface))


def _read_segmentation(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Label array in SimpleITK's (z, y, x) order with the spacing in the same order."""
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing())[::-1]


def compute_nsd(trainers: list[TrainerResults], case_ids: list[str], class_keys: list[str], tolerance_mm: float,
                gt_segmentations_dir: str | None) -> dict[str, dict[str, dict[str, float]]]:
    """NSD per trainer, case and class from the validation predictions and nnU-Net's gt_segmentations.

    Files are looked up where nnU-Net keeps them under the current environment first (summary.json holds absolute
    paths from the machine that trained), then at the recorded path.
    """
    nsd = {t.trainer: {} for t in trainers}
    for case_id in case_ids:
        reference_path = _reference_path(trainers[0].cases[case_id], gt_segmentations_dir)
        reference, spacing = _read_segmentation(reference_path)
        for t in trainers:
            prediction_path = _prediction_path(t.trainer, t.cases[case_id])
            prediction, _ = _read_segmentation(prediction_path)
            if prediction.shape != reference.shape:
                raise CompareError(f"{t.trainer}: prediction {prediction_path} has shape {prediction.shape}, "
                                   f"reference {reference_path} has {reference.shape}")
            nsd[t.trainer][case_id] = {
                key: normalized_surface_distance(np.isin(prediction, parse_class_key(key)),
                                                 np.isin(reference, parse_class_key(key)), spacing, tolerance_mm)
                for key in class_keys}
    return nsd


def _reference_path(case: CaseResult, gt_segmentations_dir: str | None) -> str:
    recorded = case.reference_file
    candidates = [os.path.join(gt_segmentations_dir, os.path.basename(recorded)) if gt_segmentations_dir else None,
                  recorded]
    path = first_existing(candidates)
    if path is None:
        raise CompareError(f"reference segmentation of case {case.case_id} not found; looked at "
                           f"{', '.join(p for p in candidates if p)} (is nnUNet_preprocessed set?)")
    return path


def _prediction_path(trainer: str, case: CaseResult) -> str:
    candidates = [os.path.join(case.fold_dir, "validation", os.path.basename(case.prediction_file)),
                  case.prediction_file]
    path = first_existing(candidates)
    if path is None:
        raise CompareError(f"{trainer}: prediction of case {case.case_id} not found; looked at "
                           f"{', '.join(candidates)}")
    return path
