"""``meddinov3 predict`` input discovery: unreadable DICOM files are named with their series, and a series with
unreadable files is skipped unless ``--allow-partial-series``; a failed run's empty results folder is no model.

Real DICOM files written by SimpleITK; no model is trained here: the checks run before a predictor is built (the
end-to-end prediction of a partial series is in tests/test_predict_clinical.py's style, not repeated here).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_meddinov3.cli.main import main
from nnunet_meddinov3.inference.dicom_series import series_uid_of_broken_file
from nnunet_meddinov3.inference.inputs import find_cases

SERIES_UID = "1.2.826.0.1.3680043.8.498.77"
DATASET = "Dataset503_Series"
TRAINER = "nnUNetTrainerMedDINOv3"
MODEL = f"{TRAINER}__nnUNetPlans__2d"


def write_series(folder, num_slices=6, series_uid=SERIES_UID) -> list:
    """One int16 CT file per slice, positions along z; returns the files in slice order."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    rng = np.random.default_rng(0)
    files = []
    for z in range(num_slices):
        slice_ = sitk.GetImageFromArray(rng.integers(-1000, 1000, (64, 64)).astype(np.int16))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{z + 1}",
                "0010|0020": "PAT", "0008|103e": "short", "0020|000d": "1.2.3", "0020|000e": series_uid,
                "0020|0013": str(z + 1), "0020|0032": f"0\\0\\{2.5 * z}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": "2.5"}
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        files.append(folder / f"IM{z:04d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(slice_)
    return files


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # an interrupted copy: header start kept, pixels gone


@pytest.fixture()
def short_series(tmp_path):
    """A 6-slice series whose first three slices are truncated: no gap shows, the rest is three even slices."""
    tree = tmp_path / "dicom tree"
    files = write_series(tree / "patient" / "series")
    for path in files[:3]:
        truncate(path)
    (tree / "patient" / "series" / "notes.txt").write_text("a note next to the series is no slice")
    return tree


def test_unreadable_files_are_named_with_their_series_and_the_series_is_skipped(short_series):
    assert series_uid_of_broken_file(short_series / "patient" / "series" / "IM0000.dcm") == SERIES_UID
    cases, skipped = find_cases(short_series)
    assert cases == []
    reasons = {s.source: s.reason for s in skipped}
    for name in ("IM0000.dcm", "IM0001.dcm", "IM0002.dcm"):
        assert reasons[f"patient/series/{name}"] == f"unreadable DICOM file (truncated or corrupt), of series {SERIES_UID}"
    series_reason = reasons[f"patient/series (series {SERIES_UID})"]
    assert "3 of its files cannot be read (IM0000.dcm, IM0001.dcm, IM0002.dcm)" in series_reason
    assert "--allow-partial-series" in series_reason
    assert "not part of a readable DICOM series" in reasons["patient/series/notes.txt"]


def test_allow_partial_series_records_the_files_used_and_left_out(short_series):
    cases, skipped = find_cases(short_series, allow_partial_series=True)
    assert len(cases) == 1
    sidecar = cases[0].dicom
    assert sidecar["files"] == ["IM0003.dcm", "IM0004.dcm", "IM0005.dcm"]
    assert sidecar["unreadable_files"] == ["IM0000.dcm", "IM0001.dcm", "IM0002.dcm"]
    assert len([s for s in skipped if "unreadable DICOM file" in s.reason]) == 3


def test_a_file_of_unknown_series_blocks_the_series_of_its_folder(tmp_path):
    tree = tmp_path / "tree"
    folder = tree / "series"
    write_series(folder, num_slices=3)
    (folder / "IM0099.dcm").write_bytes(b"\0" * 40)  # no header left at all: which series it was cannot be told
    cases, skipped = find_cases(tree)
    assert cases == []
    assert any("1 of its files cannot be read (IM0099.dcm)" in s.reason for s in skipped)
    assert any(s.source == "series/IM0099.dcm" and s.reason.endswith("series unknown") for s in skipped)


def test_complete_series_has_an_empty_left_out_list(tmp_path):
    write_series(tmp_path / "tree" / "series", num_slices=3)
    cases, skipped = find_cases(tmp_path / "tree")
    assert len(cases) == 1 and skipped == [] and cases[0].dicom["unreadable_files"] == []


@pytest.fixture()
def skeleton_model(tmp_path, monkeypatch):
    """nnU-Net folders with a model that has a fold checkpoint, and the empty folder of a run that failed."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    model = tmp_path / "nnUNet_results" / DATASET / MODEL
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                    "numTraining": 2, "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps({"dataset_name": DATASET}))
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")  # never opened below
    failed = tmp_path / "nnUNet_results" / DATASET / "nnUNetTrainerMedDINOv3_Tiny__nnUNetPlans__2d" / "fold_0"
    failed.mkdir(parents=True)
    (failed / "training_log.txt").write_text("RuntimeError: out of memory")
    return tmp_path


def predict(capsys, *argv):
    code = main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output
    return code, output


def test_predict_reports_the_skipped_series_by_name(capsys, skeleton_model, short_series):
    code, out = predict(capsys, "-i", short_series, "-o", skeleton_model / "out", "-d", "503", "-c", "2d",
                        "-tr", TRAINER, "-device", "cpu", "-npp", 0, "-nps", 0)
    assert code == 1  # nothing predicted
    assert f"SKIPPED patient/series (series {SERIES_UID}): 3 of its files cannot be read" in out
    assert f"SKIPPED patient/series/IM0001.dcm: unreadable DICOM file (truncated or corrupt), of series {SERIES_UID}" \
        in out
    assert "meddinov3 predict: 0 predicted, 5 skipped" in out


def test_a_failed_runs_empty_folder_is_not_listed_as_a_trained_model(capsys, skeleton_model, short_series):
    code, out = predict(capsys, "-i", short_series, "-o", skeleton_model / "out", "-d", "503", "-c", "2d",
                        "-tr", "nnUNetTrainerTypo", "-device", "cpu")
    assert code == 2 and f"trained models of this dataset: {MODEL}" in out
    assert "nnUNetTrainerMedDINOv3_Tiny" not in out
