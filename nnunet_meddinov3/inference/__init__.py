"""Inference on clinical inputs (nnU-Net folders, image files with any names, DICOM series) via nnU-Net's predictor."""
from nnunet_meddinov3.inference.clinical import (
    Case,
    PredictError,
    PredictionReport,
    Skipped,
    find_cases,
    find_model_folder,
    predict_cases,
    resolve_folds,
    stage_cases,
)

__all__ = [
    "Case",
    "PredictError",
    "PredictionReport",
    "Skipped",
    "find_cases",
    "find_model_folder",
    "predict_cases",
    "resolve_folds",
    "stage_cases",
]
