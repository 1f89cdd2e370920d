"""What a prediction run works on and reports: the cases, what was skipped and why, notes on changed inputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class PredictError(Exception):
    """A problem with the model or the inputs as a whole (each message says what to do)."""


@dataclass
class Case:
    """One segmentation to produce: image files (one per channel) or the slice files of one DICOM series."""
    name: str                  # output file name without .nii.gz
    source: str                # for reports: the path relative to the input folder (+ series UID)
    files: list[Path]          # channel files, or DICOM slices in slice order
    dicom: dict | None = None  # the sidecar contents for DICOM series


@dataclass
class Skipped:
    source: str
    reason: str


@dataclass
class Note:
    """Something changed in a case's input before it was predicted (e.g. NaN voxels replaced)."""
    source: str
    message: str


@dataclass
class PredictionReport:
    predicted: list[tuple[Case, Path]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[Note] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.predicted)} predicted, {len(self.skipped)} skipped"


def error_reason(error: Exception) -> str:
    """One line for the report: ITK messages start with "Exception thrown in SimpleITK ..." and end with the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
