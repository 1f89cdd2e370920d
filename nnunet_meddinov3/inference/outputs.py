"""The output folder: each prediction as ``NAME.nii.gz`` with the input's geometry, + ``NAME.json`` for DICOM."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import SimpleITK as sitk

from nnunet_meddinov3.inference.report import Case, PredictionReport, Skipped


def write_outputs(staged: dict[str, Case], predictions_folder: Path, output_folder: Path, file_ending: str,
                  failures: dict[str, str], provenance: dict, report: PredictionReport) -> None:
    """Move each staged case's segmentation to its output name; a case without one is reported as skipped.
    ``provenance`` (model folder, folds, checkpoint) goes into the DICOM sidecars."""
    output_folder.mkdir(parents=True, exist_ok=True)
    for staged_name, case in staged.items():
        prediction = predictions_folder / f"{staged_name}{file_ending}"
        if not prediction.is_file():
            reason = failures.get(staged_name, "nnU-Net wrote no segmentation")
            report.skipped.append(Skipped(case.source, f"prediction failed: {reason}"))
            continue
        output = output_folder / f"{case.name}.nii.gz"
        if file_ending == ".nii.gz":
            shutil.move(prediction, output)
        else:
            sitk.WriteImage(sitk.ReadImage(str(prediction)), str(output), useCompression=True)
        if case.dicom is not None:
            sidecar = dict(case.dicom, output=output.name, **provenance)
            (output_folder / f"{case.name}.json").write_text(json.dumps(sidecar, indent=2))
        report.predicted.append((case, output))
