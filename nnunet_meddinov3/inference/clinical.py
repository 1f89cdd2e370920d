"""Predict clinical inputs (nnU-Net folders, image files with any names, DICOM series trees) with a trained model.

Inputs are converted ("staged") into nnU-Net-named files in a temporary folder and predicted by nnU-Net's own
``nnUNetPredictor``, so every segmentation equals what ``nnUNetv2_predict`` gives on the staged files. Then each
segmentation is written to the output folder as ``NAME.nii.gz`` with the input's geometry (nnU-Net's reader/writer
carries spacing, origin and direction through).

The steps live beside this module: what counts as a case and how it is named (``inputs``, ``dicom_series``),
staging (``staging``), the model and nnU-Net's predictor (``model_folder``, ``predictor``), the output folder
(``outputs``). Every case that cannot be read or predicted is reported with the reason and skipped; the others go on.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from nnunet_meddinov3.inference.inputs import IMAGE_ENDINGS, find_cases
from nnunet_meddinov3.inference.model_folder import read_dataset_json, resolve_folds
from nnunet_meddinov3.inference.outputs import write_outputs
from nnunet_meddinov3.inference.predictor import load_predictor, predict_staged
from nnunet_meddinov3.inference.report import PredictError, PredictionReport
from nnunet_meddinov3.inference.staging import stage_cases, write_staged_index


def predict_cases(input_folder: str | Path, output_folder: str | Path, model_folder: str | Path,
                  folds: list[str] | None = None, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
                  step_size: float = 0.5, use_mirroring: bool = True, npp: int = 3, nps: int = 3,
                  keep_staged: str | Path | None = None, log: Callable[[str], None] = print,
                  allow_partial_series: bool = False) -> PredictionReport:
    """Find, stage and predict every case under ``input_folder``; write ``NAME.nii.gz`` (+ ``NAME.json`` for DICOM)
    to ``output_folder``. Raises PredictError when nothing can be attempted (no inputs, bad model)."""
    input_folder, output_folder, model_folder = Path(input_folder), Path(output_folder), Path(model_folder)
    keep_staged = Path(keep_staged) if keep_staged else None
    _check_folders(input_folder, model_folder, keep_staged)
    file_ending, num_channels = read_dataset_json(model_folder)
    folds = resolve_folds(model_folder, folds, checkpoint)

    excluded = (output_folder, keep_staged) if keep_staged else (output_folder,)
    cases, skipped = find_cases(input_folder, num_channels, exclude=excluded,
                                allow_partial_series=allow_partial_series)
    report = PredictionReport(skipped=skipped)
    if not cases and not skipped:
        raise PredictError(f"no inputs found in {input_folder}: expected DICOM series or image files "
                           f"({', '.join(IMAGE_ENDINGS)}) anywhere in the folder tree")
    log(f"Found {len(cases)} case(s) in {input_folder}; model {model_folder}, folds {folds}")

    with tempfile.TemporaryDirectory(prefix="meddinov3_predict_") as tmp:
        staging = keep_staged or Path(tmp)
        images_folder, predictions_folder = staging / "imagesTs", Path(tmp) / "predictions"
        staged = stage_cases(cases, images_folder, file_ending, report)
        if keep_staged:
            write_staged_index(staging, staged)
        failures: dict[str, str] = {}  # staged name -> why nnU-Net could not predict it
        if staged:
            predictor = load_predictor(model_folder, folds, checkpoint, device, step_size, use_mirroring)
            failures = predict_staged(predictor, images_folder, list(staged), predictions_folder, file_ending,
                                      num_channels, npp, nps, log)
        provenance = {"model_folder": str(model_folder.resolve()), "folds": folds, "checkpoint": checkpoint}
        write_outputs(staged, predictions_folder, output_folder, file_ending, failures, provenance, report)
    return report


def _check_folders(input_folder: Path, model_folder: Path, keep_staged: Path | None) -> None:
    if not input_folder.is_dir():
        raise PredictError(f"input folder not found: {input_folder}")
    if not (model_folder / "dataset.json").is_file():
        raise PredictError(f"{model_folder} has no dataset.json: not a (finished) nnUNetv2_train output folder")
    if keep_staged:
        if keep_staged.exists() and not keep_staged.is_dir():
            raise PredictError(f"--keep-staged: {keep_staged} is a file; give a new folder")
        if keep_staged.is_dir() and any(keep_staged.iterdir()):  # its cases.json and imagesTs/ would be replaced
            raise PredictError(f"--keep-staged: {keep_staged} is not empty; give a new folder")
