"""The cases in an input folder tree (the whole tree is walked; hidden files and folders are ignored).

What counts as a case:

- a **DICOM series**: the files of one folder that share a SeriesInstanceUID (found with GDCM, as SimpleITK's
  ``ImageSeriesReader`` does; slices in GDCM's position order). A series split over several folders gives one
  case per folder. Output name: ``PatientID_SeriesDescription``, made file-name safe (characters other than
  letters, digits, ``.``, ``_``, ``-`` become ``_``, at most 64 per part); the SeriesInstanceUID when both are
  empty. A JSON sidecar ``NAME.json`` records StudyInstanceUID, SeriesInstanceUID, the SOPInstanceUIDs in slice
  order, the source folder and the files.
- an **image file** (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``): for single-channel models each file is a case named
  after its file name without the ending, and without a trailing ``_0000`` (so nnU-Net folders keep nnU-Net's
  names); multi-channel models need nnU-Net's naming, ``CASE_0000.nii.gz`` ... ``CASE_000N.nii.gz``, in one folder.

Names are unique: a repeated name gets ``_2``, ``_3``, ... in path order. DICOM and image files may be mixed in one
tree. Any other file (not part of a readable series, not an image) and every case that cannot be read or predicted
is reported with the reason and skipped; the others go on.

A DICOM file GDCM cannot read (truncated, corrupt) is reported by name and by the series it belongs to: its
SeriesInstanceUID is read from its bytes when the header is too broken for GDCM, and a file whose series cannot
be told belongs, for safety, to every series of its folder. A series with such files is skipped, because the rest
of it covers less anatomy than was acquired (a short series has no gap that would show it), unless
``allow_partial_series``; the sidecar then lists the files used (``files``) and those left out
(``unreadable_files``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import SimpleITK as sitk

from nnunet_meddinov3.inference.dicom_series import (
    describe_dicom_series,
    find_folder_series,
    itk_warnings_off,
    looks_like_dicom,
    series_uid_of_broken_file,
)
from nnunet_meddinov3.inference.report import Case, Skipped, error_reason

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
NOT_CASES = {"DICOMDIR"}
NOT_AN_INPUT = f"not part of a readable DICOM series and not an image file ({', '.join(IMAGE_ENDINGS)})"
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

ChannelGroups = dict[tuple[Path, str], dict[int, Path]]  # (folder, case name) -> channel number -> file


def image_ending(file_name: str) -> str | None:
    lower = file_name.lower()
    return next((e for e in IMAGE_ENDINGS if lower.endswith(e)), None)


def find_cases(input_folder: str | Path, num_channels: int = 1, exclude: tuple[Path, ...] = (),
               allow_partial_series: bool = False) -> tuple[list[Case], list[Skipped]]:
    """Every DICOM series and image case under ``input_folder`` (see the module doc for the rules)."""
    root = Path(input_folder)
    found: list[Case | Skipped | None] = []
    channel_groups: ChannelGroups = {}
    series_reader = sitk.ImageSeriesReader()
    with itk_warnings_off():
        for folder, file_names in _input_folders(root, exclude):
            claimed, unreadable = set(), {}  # unreadable: file name -> its series UID, None if unknown
            if any(image_ending(f) is None for f in file_names):  # only then is there DICOM to look for
                folder_series = find_folder_series(series_reader, folder)
                claimed = {f.name for _, files in folder_series for f in files}
                unreadable = _unreadable_dicom_files(folder, file_names, claimed)
                found += [_series_case(root, folder, uid, files, unreadable, num_channels, allow_partial_series)
                          for uid, files in folder_series]
            found += [_file_case(root, folder / f, unreadable, num_channels, channel_groups)
                      for f in file_names if f not in claimed]
    found += _channel_group_cases(root, channel_groups, num_channels)
    cases = [c for c in found if isinstance(c, Case)]
    return _unique_names(cases), [s for s in found if isinstance(s, Skipped)]


def _input_folders(root: Path, exclude: tuple[Path, ...]) -> Iterator[tuple[Path, list[str]]]:
    """Each folder of the tree with its file names, in path order; hidden entries and excluded folders left out."""
    excluded = {p.resolve() for p in exclude}
    for folder, subfolders, file_names in os.walk(root):
        folder = Path(folder)
        subfolders[:] = sorted(d for d in subfolders
                               if not d.startswith(".") and (folder / d).resolve() not in excluded)
        yield folder, sorted(f for f in file_names if not f.startswith(".") and f not in NOT_CASES)


def _unreadable_dicom_files(folder: Path, file_names: list[str], claimed: set[str]) -> dict[str, str | None]:
    """DICOM files no series claimed (GDCM cannot read them) -> the series UID in their bytes, None if unknown."""
    return {f: series_uid_of_broken_file(folder / f) for f in file_names
            if f not in claimed and image_ending(f) is None and looks_like_dicom(folder / f)}


def _series_case(root: Path, folder: Path, uid: str, files: list[Path], unreadable: dict[str, str | None],
                 num_channels: int, allow_partial_series: bool) -> Case | Skipped:
    source = f"{folder.relative_to(root)} (series {uid})"
    left_out = sorted(f for f, owner in unreadable.items() if owner in (uid, None))
    if num_channels != 1:
        return Skipped(source, f"the model needs {num_channels} input channels per case; a DICOM series is one: "
                               "convert the series to nnU-Net-named files (CASE_0000.nii.gz, CASE_0001.nii.gz, ...)")
    if left_out and not allow_partial_series:
        return Skipped(source, f"{len(left_out)} of its files cannot be read ({', '.join(left_out)}), so the "
                               f"{len(files)} readable ones may cover less anatomy than was acquired: repair or "
                               "remove those files, or pass --allow-partial-series to predict the readable slices")
    try:
        name, sidecar = describe_dicom_series(folder, files)
    except RuntimeError as e:
        return Skipped(source, f"unreadable DICOM header: {error_reason(e)}")
    sidecar["unreadable_files"] = left_out
    return Case(name, source, files, sidecar)


def _file_case(root: Path, path: Path, unreadable: dict[str, str | None], num_channels: int,
               channel_groups: ChannelGroups) -> Case | Skipped | None:
    """The case of a file no series claimed, or why it is none; None for a channel file, added to its group."""
    source = str(path.relative_to(root))
    if path.name in unreadable:
        owner = unreadable[path.name]
        return Skipped(source, "unreadable DICOM file (truncated or corrupt), "
                               + (f"of series {owner}" if owner else "series unknown"))
    ending = image_ending(path.name)
    if ending is None:
        return Skipped(source, NOT_AN_INPUT)
    stem = path.name[:-len(ending)]
    match = CHANNEL_SUFFIX.match(stem)
    if num_channels == 1:
        return Case(match["case"] if match and match["channel"] == "0000" else stem, source, [path])
    if match is None:
        return Skipped(source, _naming_help(num_channels))
    channel_groups.setdefault((path.parent, match["case"]), {})[int(match["channel"])] = path
    return None


def _channel_group_cases(root: Path, channel_groups: ChannelGroups, num_channels: int) -> list[Case | Skipped]:
    found = []
    for (folder, case_name), channels in channel_groups.items():
        source = str((folder / case_name).relative_to(root))
        if sorted(channels) != list(range(num_channels)):
            found.append(Skipped(source, f"has channels {sorted(channels)}: {_naming_help(num_channels)}"))
        else:
            found.append(Case(case_name, source, [channels[c] for c in range(num_channels)]))
    return found


def _naming_help(num_channels: int) -> str:
    return (f"the model needs {num_channels} input channels per case, so files must follow nnU-Net's naming: "
            f"CASE_0000.nii.gz ... CASE_{num_channels - 1:04d}.nii.gz (same CASE, one file per channel, one folder)")


def _unique_names(cases: list[Case]) -> list[Case]:
    # Output names must not collide in the flat output folder (compared case-blind for macOS/Windows disks);
    # the sidecars and the report say which source each name came from.
    cases = sorted(cases, key=lambda c: c.source)
    taken: set[str] = set()
    for case in cases:
        name, number = case.name, 1
        while name.lower() in taken:
            number += 1
            name = f"{case.name}_{number}"
        case.name = name
        taken.add(name.lower())
    return cases
