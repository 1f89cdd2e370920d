"""Staging: each readable case written as nnU-Net-named files (``case_00000_0000.nii.gz``, ...) for nnU-Net."""
from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from nnunet_meddinov3.inference.dicom_series import read_dicom_series
from nnunet_meddinov3.inference.inputs import IMAGE_ENDINGS
from nnunet_meddinov3.inference.non_finite import replace_non_finite
from nnunet_meddinov3.inference.report import Case, Note, PredictError, PredictionReport, Skipped, error_reason

# Dataset file endings we can stage to: SimpleITK writes them with the full geometry and nnU-Net reads them back.
STAGEABLE_ENDINGS = IMAGE_ENDINGS


def read_case(case: Case) -> list[sitk.Image]:
    """The case's images (one per channel), checked to be what nnU-Net can predict."""
    if case.dicom is not None:
        images = [read_dicom_series(case.files)]
    else:
        images = [sitk.ReadImage(str(f)) for f in case.files]
    for image in images:
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{image.GetNumberOfComponentsPerPixel()} components per pixel (colour images are not "
                             "supported)")
        if image.GetDimension() not in (2, 3):
            raise ValueError(f"{image.GetDimension()}D image (2D or 3D needed)")
    first = images[0]
    for image in images[1:]:
        if (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()) != \
                (first.GetSize(), first.GetSpacing(), first.GetOrigin(), first.GetDirection()):
            raise ValueError("the channel images differ in size or geometry")
    return images


def stage_cases(cases: list[Case], images_folder: Path, file_ending: str,
                report: PredictionReport) -> dict[str, Case]:
    """Write each readable case as nnU-Net-named files (``case_00000_0000.nii.gz``, ...); staged name -> case."""
    if file_ending not in STAGEABLE_ENDINGS:
        raise PredictError(f"this model was trained on {file_ending} files; meddinov3 predict stages inputs as "
                           f"{', '.join(STAGEABLE_ENDINGS)} only: use nnUNetv2_predict on {file_ending} files")
    images_folder.mkdir(parents=True, exist_ok=True)
    staged = {}
    for index, case in enumerate(cases):
        staged_name = f"case_{index:05d}"
        try:
            images, note = replace_non_finite(read_case(case), None if case.dicom else case.files)
        except (RuntimeError, ValueError) as e:
            report.skipped.append(Skipped(case.source, f"cannot read: {error_reason(e)}"))
            continue
        if note:
            report.warnings.append(Note(case.source, note))
        for channel, image in enumerate(images):
            sitk.WriteImage(image, str(images_folder / f"{staged_name}_{channel:04d}{file_ending}"))
        staged[staged_name] = case
    return staged


def write_staged_index(staging_folder: Path, staged: dict[str, Case]) -> None:
    """``cases.json``: staged name -> output name and source, to find a case again in a kept staging folder."""
    (staging_folder / "cases.json").write_text(json.dumps(
        {n: {"output": f"{c.name}.nii.gz", "source": c.source} for n, c in staged.items()}, indent=2))
