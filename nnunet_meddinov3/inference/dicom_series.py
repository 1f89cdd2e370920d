"""DICOM series as prediction inputs: headers, output names and sidecars, broken files, slice geometry."""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SERIES_UID_TAG = b"\x20\x00\x0e\x00"  # (0020,000E) SeriesInstanceUID, little endian
DICOM_TAGS = {"StudyInstanceUID": "0020|000d", "SeriesInstanceUID": "0020|000e", "SOPInstanceUID": "0008|0018",
              "PatientID": "0010|0020", "SeriesDescription": "0008|103e", "Modality": "0008|0060"}
# ITK builds a volume with one even slice spacing; a series whose slice steps differ from it by more than this
# fraction (e.g. a missing slice: 100%) is skipped. Loose on purpose: scanners round the positions.
MAX_SLICE_SPACING_DEVIATION = 0.1


@contextmanager
def itk_warnings_off():
    # GDCM warns "No Series were found" for every folder without DICOM: noise, not news.
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def safe_name(text: str, limit: int = 64) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:limit].strip("._-")


def read_dicom_header(path: Path) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {name: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
            for name, tag in DICOM_TAGS.items()}


def describe_dicom_series(folder: Path, files: list[Path]) -> tuple[str, dict]:
    """(output name, sidecar) of one series, from each slice file's header."""
    headers = [read_dicom_header(f) for f in files]
    first = headers[0]
    name = "_".join(p for p in (safe_name(first["PatientID"]), safe_name(first["SeriesDescription"])) if p)
    sidecar = {"StudyInstanceUID": first["StudyInstanceUID"], "SeriesInstanceUID": first["SeriesInstanceUID"],
               "SOPInstanceUIDs": [h["SOPInstanceUID"] for h in headers],
               "PatientID": first["PatientID"], "SeriesDescription": first["SeriesDescription"],
               "Modality": first["Modality"], "source_folder": str(folder.resolve()),
               "files": [f.name for f in files]}
    return name or safe_name(first["SeriesInstanceUID"]) or "series", sidecar


def looks_like_dicom(path: Path) -> bool:
    """A DICOM name ending, or the 'DICM' marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def series_uid_of_broken_file(path: Path, limit: int = 1 << 16) -> str | None:
    """The SeriesInstanceUID of a DICOM file GDCM cannot read, found in its first bytes (explicit or implicit
    VR, little endian), or None."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return None
    start = 0
    while (at := data.find(SERIES_UID_TAG, start)) >= 0:
        start = at + 1
        if data[at + 4:at + 6] == b"UI":  # explicit VR: 2-byte length
            length, value_at = int.from_bytes(data[at + 6:at + 8], "little"), at + 8
        else:                             # implicit VR: 4-byte length
            length, value_at = int.from_bytes(data[at + 4:at + 8], "little"), at + 8
        value = data[value_at:value_at + length].rstrip(b"\x00 ")
        if 0 < length <= 64 and len(value) and re.fullmatch(rb"[0-9.]+", value):
            return value.decode()
    return None


def find_folder_series(reader: sitk.ImageSeriesReader, folder: Path) -> list[tuple[str, list[Path]]]:
    """(SeriesInstanceUID, slice files in GDCM's position order) of each series GDCM finds in ``folder``."""
    return [(uid, [Path(f) for f in reader.GetGDCMSeriesFileNames(str(folder), uid)])
            for uid in reader.GetGDCMSeriesIDs(str(folder))]


def read_dicom_series(files: list[Path]) -> sitk.Image:
    """The series' volume; a ValueError when its slices are missing or unevenly spaced."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice positions
    with itk_warnings_off():
        volume = reader.Execute()
    deviation = slice_spacing_deviation(volume, reader)
    if deviation > MAX_SLICE_SPACING_DEVIATION * volume.GetSpacing()[-1]:
        raise ValueError(f"missing slices or uneven slice spacing (a slice step is {deviation:.3g} mm off the "
                         f"volume's {volume.GetSpacing()[-1]:.3g} mm): its geometry would not match the slices")
    return volume


def slice_spacing_deviation(volume: sitk.Image, reader: sitk.ImageSeriesReader) -> float:
    """Largest difference (mm) between a slice-to-slice step along the volume's normal and its slice spacing."""
    num_slices = len(reader.GetFileNames())
    if volume.GetDimension() != 3 or num_slices < 2 or \
            not all(reader.HasMetaDataKey(k, "0020|0032") for k in range(num_slices)):
        return 0.0
    positions = np.array([[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")]
                          for k in range(num_slices)])
    normal = np.array(volume.GetDirection()).reshape(3, 3)[:, 2]
    return float(np.abs(np.diff(positions @ normal) - volume.GetSpacing()[2]).max())
