"""Predict clinical inputs (nnU-Net folders, image files with any names, DICOM series trees) with a trained model.

Inputs are converted ("staged") into nnU-Net-named files in a temporary folder and predicted by nnU-Net's own
``nnUNetPredictor``, so every segmentation equals what ``nnUNetv2_predict`` gives on the staged files. Then each
segmentation is written to the output folder as ``NAME.nii.gz`` with the input's geometry (nnU-Net's reader/writer
carries spacing, origin and direction through).

What counts as a case (the whole input tree is walked; hidden files and folders are ignored):

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

import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from nnunet_meddinov3.inference.non_finite import replace_non_finite
from nnunet_meddinov3.training.crash_safety import CHECKPOINT_ORDER, unreadable_reason

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
# Dataset file endings we can stage to: SimpleITK writes them with the full geometry and nnU-Net reads them back.
STAGEABLE_ENDINGS = IMAGE_ENDINGS
NOT_CASES = {"DICOMDIR"}
NOT_AN_INPUT = f"not part of a readable DICOM series and not an image file ({', '.join(IMAGE_ENDINGS)})"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SERIES_UID_TAG = b"\x20\x00\x0e\x00"  # (0020,000E) SeriesInstanceUID, little endian
DICOM_TAGS = {"StudyInstanceUID": "0020|000d", "SeriesInstanceUID": "0020|000e", "SOPInstanceUID": "0008|0018",
              "PatientID": "0010|0020", "SeriesDescription": "0008|103e", "Modality": "0008|0060"}
# ITK builds a volume with one even slice spacing; a series whose slice steps differ from it by more than this
# fraction (e.g. a missing slice: 100%) is skipped. Loose on purpose: scanners round the positions.
MAX_SLICE_SPACING_DEVIATION = 0.1
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


# ---------------------------------------------------------------------------------------------- model

def find_model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG`` via nnU-Net's own helper, or a PredictError."""
    results = os.environ.get("nnUNet_results")
    if not results:
        raise PredictError("the environment variable nnUNet_results is not set: point it at the folder nnUNetv2_train "
                           "wrote the trained model to (export nnUNet_results=/path/to/nnUNet_results)")
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    train = f"nnUNetv2_train {dataset} {configuration} FOLD -tr {trainer} -p {plans}"
    try:
        folder = Path(get_output_folder(dataset, trainer, plans, configuration))
    except (RuntimeError, ValueError) as e:  # nnU-Net cannot map the dataset id to a DatasetXXX_Name folder
        raise PredictError(f"dataset {dataset!r} not found under nnUNet_results={results} (nor nnUNet_raw / "
                           f"nnUNet_preprocessed): {str(e).splitlines()[0]}\n  train a model first: {train}") from e
    if not folder.is_dir():
        # a failed or interrupted run leaves a folder without checkpoints: not a trained model
        trained = sorted(p.name for p in folder.parent.iterdir()
                         if p.is_dir() and "__" in p.name and any(p.glob("fold_*/checkpoint_*.pth"))) \
            if folder.parent.is_dir() else []
        raise PredictError(f"model folder not found: {folder}\n  train it first: {train}  (FOLD = 0-4 or all)"
                           + (f"\n  trained models of this dataset: {', '.join(trained)}" if trained else ""))
    return folder


def resolve_folds(model_folder: Path, folds: list[str] | None, checkpoint: str) -> list[int | str]:
    """The folds to ensemble: the ones asked for (each must have the checkpoint) or every fold that has it."""
    if not folds:
        folds = sorted((p.name[5:] for p in model_folder.glob("fold_*") if (p / checkpoint).is_file()),
                       key=lambda f: (f == "all", f))
        if not folds:
            raise PredictError(f"no fold of {model_folder} has {checkpoint}: train one "
                               f"(nnUNetv2_train ... FOLD) or name another checkpoint with -chk")
    missing = [f for f in folds if not (model_folder / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise PredictError(f"{checkpoint} missing for fold(s) {', '.join(map(str, missing))} in {model_folder}: "
                           f"train them, pick other folds with -f, or another checkpoint with -chk")
    return [f if f == "all" else int(f) for f in folds]


def unreadable_checkpoint_note(model_folder: Path, folds: list[int | str], checkpoint: str) -> str | None:
    """What to say about a fold's checkpoint that cannot be read (a write killed halfway, a full disk): nnU-Net's
    predictor fails on it with a message that names no file."""
    for fold in folds:
        path = model_folder / f"fold_{fold}" / checkpoint
        reason = unreadable_reason(str(path))
        if reason is None:
            continue
        intact = [n for n in CHECKPOINT_ORDER if n != checkpoint and (path.parent / n).is_file()
                  and unreadable_reason(str(path.parent / n)) is None]
        return (f"{path} cannot be read ({reason}); it was probably cut short by a killed write or a full disk. "
                + (f"Intact in fold_{fold}: {', '.join(intact)} (predict with -chk NAME), or" if intact else "Either")
                + " finish the training with nnUNetv2_train ... --c (it goes on from the newest readable checkpoint "
                  "and writes a new checkpoint_final.pth), or pick other folds with -f.")
    return None


def make_predictor(model_folder: Path, folds: list[int | str], checkpoint: str, device: str = "cuda",
                   step_size: float = 0.5, use_mirroring: bool = True):
    """nnU-Net's predictor set up as ``nnUNetv2_predict`` sets it up."""
    import multiprocessing

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch_device = torch.device(device)
    if torch_device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_predict does
    elif torch_device.type == "cuda":
        torch.set_num_threads(1)
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=True, device=torch_device)
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint_name=checkpoint)
    return predictor


# ---------------------------------------------------------------------------------------------- inputs

@contextmanager
def _itk_warnings_off():
    # GDCM warns "No Series were found" for every folder without DICOM: noise, not news.
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def image_ending(file_name: str) -> str | None:
    lower = file_name.lower()
    return next((e for e in IMAGE_ENDINGS if lower.endswith(e)), None)


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


def find_cases(input_folder: str | Path, num_channels: int = 1, exclude: tuple[Path, ...] = (),
               allow_partial_series: bool = False) -> tuple[list[Case], list[Skipped]]:
    """Every DICOM series and image case under ``input_folder`` (see the module doc for the rules)."""
    root = Path(input_folder)
    excluded = {p.resolve() for p in exclude}
    cases, skipped = [], []
    channel_groups: dict[tuple[Path, str], dict[int, Path]] = {}
    series_reader = sitk.ImageSeriesReader()
    with _itk_warnings_off():
        for folder, subfolders, file_names in os.walk(root):
            folder = Path(folder)
            subfolders[:] = sorted(d for d in subfolders
                                   if not d.startswith(".") and (folder / d).resolve() not in excluded)
            file_names = sorted(f for f in file_names if not f.startswith(".") and f not in NOT_CASES)
            claimed, unreadable = set(), {}  # unreadable: file name -> its series UID, None if unknown
            if any(image_ending(f) is None for f in file_names):  # only then is there DICOM to look for
                folder_series = []
                for uid in series_reader.GetGDCMSeriesIDs(str(folder)):
                    files = [Path(f) for f in series_reader.GetGDCMSeriesFileNames(str(folder), uid)]
                    claimed.update(f.name for f in files)
                    folder_series.append((uid, files))
                unreadable = {f: series_uid_of_broken_file(folder / f) for f in file_names
                              if f not in claimed and image_ending(f) is None and looks_like_dicom(folder / f)}
                for uid, files in folder_series:
                    source = f"{folder.relative_to(root)} (series {uid})"
                    left_out = sorted(f for f, owner in unreadable.items() if owner in (uid, None))
                    if num_channels != 1:
                        skipped.append(Skipped(source, f"the model needs {num_channels} input channels per case; a "
                                                       "DICOM series is one: convert the series to nnU-Net-named "
                                                       "files (CASE_0000.nii.gz, CASE_0001.nii.gz, ...)"))
                        continue
                    if left_out and not allow_partial_series:
                        skipped.append(Skipped(source, f"{len(left_out)} of its files cannot be read "
                                                       f"({', '.join(left_out)}), so the {len(files)} readable ones "
                                                       "may cover less anatomy than was acquired: repair or remove "
                                                       "those files, or pass --allow-partial-series to predict the "
                                                       "readable slices"))
                        continue
                    try:
                        name, sidecar = describe_dicom_series(folder, files)
                    except RuntimeError as e:
                        skipped.append(Skipped(source, f"unreadable DICOM header: {_reason(e)}"))
                        continue
                    sidecar["unreadable_files"] = left_out
                    cases.append(Case(name, source, files, sidecar))
            for file_name in file_names:
                path, ending = folder / file_name, image_ending(file_name)
                if file_name in claimed:
                    continue
                if file_name in unreadable:
                    owner = unreadable[file_name]
                    skipped.append(Skipped(str(path.relative_to(root)), "unreadable DICOM file (truncated or "
                                           "corrupt), " + (f"of series {owner}" if owner else "series unknown")))
                    continue
                if ending is None:
                    skipped.append(Skipped(str(path.relative_to(root)), NOT_AN_INPUT))
                    continue
                stem = file_name[:-len(ending)]
                match = CHANNEL_SUFFIX.match(stem)
                if num_channels == 1:
                    name = match["case"] if match and match["channel"] == "0000" else stem
                    cases.append(Case(name, str(path.relative_to(root)), [path]))
                elif match is None:
                    skipped.append(Skipped(str(path.relative_to(root)), _naming_help(num_channels)))
                else:
                    channel_groups.setdefault((folder, match["case"]), {})[int(match["channel"])] = path
    for (folder, case_name), channels in channel_groups.items():
        source = str((folder / case_name).relative_to(root))
        if sorted(channels) != list(range(num_channels)):
            skipped.append(Skipped(source, f"has channels {sorted(channels)}: {_naming_help(num_channels)}"))
        else:
            cases.append(Case(case_name, source, [channels[c] for c in range(num_channels)]))
    return _unique_names(cases), skipped


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


def _reason(error: Exception) -> str:
    """One line for the report: ITK messages start with "Exception thrown in SimpleITK ..." and end with the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def read_case(case: Case) -> list[sitk.Image]:
    """The case's images (one per channel), checked to be what nnU-Net can predict."""
    if case.dicom is not None:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in case.files])
        reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice positions
        with _itk_warnings_off():
            images = [reader.Execute()]
        deviation = slice_spacing_deviation(images[0], reader)
        if deviation > MAX_SLICE_SPACING_DEVIATION * images[0].GetSpacing()[-1]:
            raise ValueError(f"missing slices or uneven slice spacing (a slice step is {deviation:.3g} mm off the "
                             f"volume's {images[0].GetSpacing()[-1]:.3g} mm): its geometry would not match the slices")
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
            report.skipped.append(Skipped(case.source, f"cannot read: {_reason(e)}"))
            continue
        if note:
            report.warnings.append(Note(case.source, note))
        for channel, image in enumerate(images):
            sitk.WriteImage(image, str(images_folder / f"{staged_name}_{channel:04d}{file_ending}"))
        staged[staged_name] = case
    return staged


# ---------------------------------------------------------------------------------------------- prediction

def run_nnunet(predictor, images_folder: Path, staged_names: list[str], predictions_folder: Path, file_ending: str,
               num_channels: int, npp: int = 3, nps: int = 3) -> None:
    """nnU-Net's batch prediction, as ``nnUNetv2_predict -npp/-nps`` (both 0: its sequential mode)."""
    inputs = [[str(images_folder / f"{n}_{c:04d}{file_ending}") for c in range(num_channels)] for n in staged_names]
    outputs = [str(predictions_folder / n) for n in staged_names]
    predictions_folder.mkdir(parents=True, exist_ok=True)  # nnU-Net's sequential mode expects it
    if npp == 0 and nps == 0:
        predictor.predict_from_files_sequential(inputs, outputs)
    else:
        predictor.predict_from_files(inputs, outputs, num_processes_preprocessing=max(npp, 1),
                                     num_processes_segmentation_export=max(nps, 1))


def predict_cases(input_folder: str | Path, output_folder: str | Path, model_folder: str | Path,
                  folds: list[str] | None = None, checkpoint: str = "checkpoint_final.pth", device: str = "cuda",
                  step_size: float = 0.5, use_mirroring: bool = True, npp: int = 3, nps: int = 3,
                  keep_staged: str | Path | None = None, log: Callable[[str], None] = print,
                  allow_partial_series: bool = False) -> PredictionReport:
    """Find, stage and predict every case under ``input_folder``; write ``NAME.nii.gz`` (+ ``NAME.json`` for DICOM)
    to ``output_folder``. Raises PredictError when nothing can be attempted (no inputs, bad model)."""
    input_folder, output_folder, model_folder = Path(input_folder), Path(output_folder), Path(model_folder)
    if not input_folder.is_dir():
        raise PredictError(f"input folder not found: {input_folder}")
    if not (model_folder / "dataset.json").is_file():
        raise PredictError(f"{model_folder} has no dataset.json: not a (finished) nnUNetv2_train output folder")
    if keep_staged:
        staged_folder = Path(keep_staged)
        if staged_folder.exists() and not staged_folder.is_dir():
            raise PredictError(f"--keep-staged: {staged_folder} is a file; give a new folder")
        if staged_folder.is_dir() and any(staged_folder.iterdir()):  # its cases.json and imagesTs/ would be replaced
            raise PredictError(f"--keep-staged: {staged_folder} is not empty; give a new folder")
    try:
        dataset_json = json.loads((model_folder / "dataset.json").read_text())
        file_ending = dataset_json["file_ending"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PredictError(f"{model_folder / 'dataset.json'} is not an nnU-Net dataset.json with a file_ending "
                           f"({_reason(e)})") from None
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    folds = resolve_folds(model_folder, folds, checkpoint)

    excluded = (output_folder, Path(keep_staged)) if keep_staged else (output_folder,)
    cases, skipped = find_cases(input_folder, num_channels, exclude=excluded,
                                allow_partial_series=allow_partial_series)
    report = PredictionReport(skipped=skipped)
    if not cases and not skipped:
        raise PredictError(f"no inputs found in {input_folder}: expected DICOM series or image files "
                           f"({', '.join(IMAGE_ENDINGS)}) anywhere in the folder tree")
    log(f"Found {len(cases)} case(s) in {input_folder}; model {model_folder}, folds {folds}")

    with tempfile.TemporaryDirectory(prefix="meddinov3_predict_") as tmp:
        staging = Path(keep_staged) if keep_staged else Path(tmp)
        images_folder, predictions_folder = staging / "imagesTs", Path(tmp) / "predictions"
        staged = stage_cases(cases, images_folder, file_ending, report)
        if keep_staged:
            (staging / "cases.json").write_text(json.dumps(
                {n: {"output": f"{c.name}.nii.gz", "source": c.source} for n, c in staged.items()}, indent=2))
        failures: dict[str, str] = {}  # staged name -> why nnU-Net could not predict it
        if staged:
            try:
                predictor = make_predictor(model_folder, folds, checkpoint, device, step_size, use_mirroring)
            except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
                note = unreadable_checkpoint_note(model_folder, folds, checkpoint)
                raise PredictError(f"cannot load the model in {model_folder} ({_reason(e)}); it must be a finished "
                                   f"nnUNetv2_train output: plans.json, dataset.json and fold_N/{checkpoint}"
                                   + (f"\n  {note}" if note else "")) from None
            try:
                run_nnunet(predictor, images_folder, list(staged), predictions_folder, file_ending, num_channels,
                           npp, nps)
            except Exception as e:  # one bad case stops nnU-Net's whole batch: find it by predicting one by one
                log(f"nnU-Net's batch prediction failed ({_reason(e)}); predicting the cases one at a time")
                for staged_name in staged:
                    if not (predictions_folder / f"{staged_name}{file_ending}").is_file():
                        try:
                            run_nnunet(predictor, images_folder, [staged_name], predictions_folder, file_ending,
                                       num_channels, 0, 0)
                        except Exception as case_error:
                            failures[staged_name] = _reason(case_error)
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
                sidecar = dict(case.dicom, output=output.name, model_folder=str(model_folder.resolve()),
                               folds=folds, checkpoint=checkpoint)
                (output_folder / f"{case.name}.json").write_text(json.dumps(sidecar, indent=2))
            report.predicted.append((case, output))
    return report
