"""Inference on clinical inputs (nnU-Net folders, image files with any names, DICOM series) via nnU-Net's predictor."""
from nnunet_meddinov3.inference.clinical import predict_cases
from nnunet_meddinov3.inference.inputs import find_cases
from nnunet_meddinov3.inference.model_folder import find_model_folder, resolve_folds
from nnunet_meddinov3.inference.report import Case, PredictError, PredictionReport, Skipped
from nnunet_meddinov3.inference.staging import stage_cases

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
