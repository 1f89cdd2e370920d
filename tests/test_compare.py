"""``meddinov3 compare`` on fabricated nnU-Net result folders, plus its pure functions.

The CLI runs in a subprocess because nnU-Net's path variables come from the environment. The result folders hold
predictions and references as NIfTI, and nnU-Net's own ``compute_metrics_on_folder`` writes each fold's
summary.json from them; expected numbers are computed here with numpy/scipy from the Dice values in those files.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import wilcoxon

from nnunet_meddinov3.evaluation.folders import case_identifier, class_display_name, parse_class_key, read_label_names
from nnunet_meddinov3.evaluation.statistics import compare_metric, paired_wilcoxon_p
from nnunet_meddinov3.evaluation.surface_distance import normalized_surface_distance

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "Dataset001_Organs"
BASELINE, OTHER = "nnUNetTrainer", "nnUNetTrainerMedDINOv3"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
NAN = float("nan")

# Cases per trainer and fold. The references hold three 4x4 squares (liver, spleen, kidney); case_04 has no spleen
# in reference or prediction (nnU-Net writes NaN). Baseline predictions equal the references in fold 0 and have the
# liver one pixel off in fold 1; OTHER's liver is one pixel off (Dice 0.75, NSD 0.5 at 0 mm) and its kidney equals the
# baseline's (all-zero differences -> p = 1). Fold 1 of OTHER is missing.
CASES = {
    BASELINE: {0: [f"case_{i:02d}" for i in range(6)], 1: ["case_06", "case_07", "case_08"]},
    OTHER: {0: [f"case_{i:02d}" for i in range(6)]},
}
COMMON_CASES = sorted(CASES[OTHER][0])


def _squares(shift_liver: int, with_spleen: bool) -> np.ndarray:
    """One 2D slice as nnU-Net stores 2D NIfTI: shape (1, y, x). Liver, spleen, kidney are 4x4 squares."""
    seg = np.zeros((1, 16, 24), dtype=np.uint8)
    seg[0, 2:6, 2 + shift_liver:6 + shift_liver] = 1
    if with_spleen:
        seg[0, 2:6, 12:16] = 2
    seg[0, 9:13, 2:6] = 3
    return seg


def _write_nifti(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))  # x, y in-plane 1 mm; the single slice is 3 mm thick
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _nnunet_summary(reference_dir: Path, prediction_dir: Path, output_file: Path) -> None:
    """summary.json as nnU-Net's evaluation writes it after validation (labels 1, 2, 3)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    compute_metrics_on_folder(str(reference_dir), str(prediction_dir), str(output_file), SimpleITKIO(), ".nii.gz",
                              [1, 2, 3], num_processes=1)


def _dice_tables(results: Path) -> dict:
    """{trainer: {case: (Dice liver, spleen, kidney)}} of fold 0, read back from the summary.json files nnU-Net wrote."""
    tables = {}
    for trainer in (BASELINE, OTHER):
        summary = json.loads((results / DATASET / f"{trainer}__nnUNetPlans__2d" / "fold_0" / "validation" /
                              "summary.json").read_text())
        tables[trainer] = {case_identifier(c["prediction_file"]): tuple(float(c["metrics"][k]["Dice"])
                                                                       for k in ("1", "2", "3"))
                           for c in summary["metric_per_case"]}
    return tables


@pytest.fixture
def nnunet_dirs(tmp_path):
    raw, preprocessed, results = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    raw.mkdir()
    gt_dir = preprocessed / DATASET / "gt_segmentations"
    all_cases = sorted({c for folds in CASES.values() for cases in folds.values() for c in cases})
    for case_id in all_cases:
        _write_nifti(_squares(0, with_spleen=case_id != "case_04"), gt_dir / f"{case_id}.nii.gz")
    for trainer, folds in CASES.items():
        trainer_dir = results / DATASET / f"{trainer}__nnUNetPlans__2d"
        for fold, cases in folds.items():
            validation = trainer_dir / f"fold_{fold}" / "validation"
            validation.mkdir(parents=True)
            # OTHER was validated on "another machine": its summary records prediction paths that do not exist
            # here, and compare must find the files locally by name.
            predicted_in = tmp_path / "other_machine" / trainer / f"fold_{fold}" if trainer == OTHER else validation
            shift = 1 if trainer == OTHER or fold == 1 else 0
            for case_id in cases:
                _write_nifti(_squares(shift, with_spleen=case_id != "case_04"), predicted_in / f"{case_id}.nii.gz")
            _nnunet_summary(gt_dir, predicted_in, validation / "summary.json")
            if predicted_in != validation:
                for case_id in cases:
                    (predicted_in / f"{case_id}.nii.gz").rename(validation / f"{case_id}.nii.gz")
    (results / DATASET / f"{BASELINE}__nnUNetPlans__2d" / "dataset.json").write_text(
        json.dumps({"labels": LABELS, "file_ending": ".nii.gz", "numTraining": 9, "channel_names": {"0": "CT"}}))
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(results), "PYTHONPATH": str(REPO_ROOT)}
    return {"results": results, "env": env, "dice": _dice_tables(results)}


def _compare(env, *arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnunet_meddinov3.cli.main", "compare", *arguments],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def _table_lines(stdout: str, title: str) -> dict[str, str]:
    """Rows of the table whose explanation line starts with ``title``, keyed by the class column."""
    block = stdout.split(f"\n{title}:", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # skip explanation and header
    return {line.split("  ")[0].strip(): line for line in block}


def _expected_row(values_by_trainer: dict[str, list[float]]) -> dict:
    base, other = np.array(values_by_trainer[BASELINE]), np.array(values_by_trainer[OTHER])
    differences = other - base
    p = 1.0 if np.all(differences == 0) else wilcoxon(other, base).pvalue
    return {"n": len(base), "mean": (base.mean(), other.mean()), "std": (base.std(ddof=1), other.std(ddof=1)),
            "diff": other.mean() - base.mean(), "p": float(p)}


def _expected_dice_rows(dice: dict) -> dict[str, dict]:
    rows = {}
    for index, name in enumerate(("1 liver", "2 spleen", "3 kidney")):
        cases = [c for c in COMMON_CASES if not math.isnan(dice[BASELINE][c][index])]
        rows[name] = _expected_row({t: [dice[t][c][index] for c in cases] for t in dice})
    rows["mean (foreground)"] = _expected_row(
        {t: [float(np.nanmean(dice[t][c])) for c in COMMON_CASES] for t in dice})
    return rows


def _assert_row_printed(line: str, expected: dict) -> None:
    assert f" {expected['n']} " in line
    for mean, std in zip(expected["mean"], expected["std"]):
        assert f"{mean:.4f} +/- {std:.4f}" in line
    assert f"{expected['diff']:+.4f}" in line
    assert line.rstrip().endswith(f"{expected['p']:.4f}")


def test_compare_cli_on_nnunet_result_folders(nnunet_dirs):
    completed = _compare(nnunet_dirs["env"], "-d", "1", "-c", "2d", "--trainers", BASELINE, OTHER,
                         "--folds", "0", "1", "--nsd-tolerance", "0")
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout

    # folds and case matching
    assert f"{BASELINE}: folds 0 1 (9 cases) [baseline]" in out
    assert f"{OTHER}: folds 0 (6 cases)" in out
    assert "missing fold 1: not trained (no fold folder)" in out
    assert f"Cases: 6 present for every trainer are compared, 3 dropped ({BASELINE}: 3" in out

    # Dice table against numbers computed here
    expected = _expected_dice_rows(nnunet_dirs["dice"])
    assert {d[0] for d in nnunet_dirs["dice"][OTHER].values()} == {0.75}  # a 4x4 square one pixel off
    printed = _table_lines(out, "Dice")
    assert set(printed) == set(expected)
    for name, row in expected.items():
        _assert_row_printed(printed[name], row)
    assert expected["3 kidney"]["p"] == 1.0 and expected["2 spleen"]["n"] == 5
    assert 0 < expected["1 liver"]["p"] < 0.05 and expected["1 liver"]["diff"] == pytest.approx(-0.25)

    # NSD at 0 mm: baseline predictions equal the references; OTHER's liver is one pixel off -> NSD 0.5 (see the
    # hand computation in test_nsd_two_squares_offset_by_one_pixel); NaN spleen of case_04 is left out.
    printed_nsd = _table_lines(out, "NSD at 0 mm")
    _assert_row_printed(printed_nsd["1 liver"], {"n": 6, "mean": (1.0, 0.5), "std": (0.0, 0.0), "diff": -0.5,
                                                 "p": wilcoxon([0.5] * 6, [1.0] * 6).pvalue})
    _assert_row_printed(printed_nsd["2 spleen"], {"n": 5, "mean": (1.0, 1.0), "std": (0.0, 0.0), "diff": 0.0,
                                                  "p": 1.0})

    # files in the default output folder, and the summary says where they went
    out_dir = nnunet_dirs["results"] / DATASET / "compare_2d_nnUNetPlans"
    for name in ("comparison.csv", "comparison.json", "boxplot.png"):
        assert str(out_dir / name) in out

    with open(out_dir / "comparison.csv") as f:
        csv_rows = {(r["metric"], r["class_name"], r["trainer"]): r for r in csv.DictReader(f)}
    liver = csv_rows[("Dice", "liver", OTHER)]
    assert int(liver["n_cases"]) == 6
    assert float(liver["mean"]) == pytest.approx(expected["1 liver"]["mean"][1])
    assert float(liver["diff_to_baseline"]) == pytest.approx(expected["1 liver"]["diff"])
    assert float(liver["p_value_wilcoxon"]) == pytest.approx(expected["1 liver"]["p"])
    assert csv_rows[("Dice", "liver", BASELINE)]["p_value_wilcoxon"] == ""
    assert float(csv_rows[("NSD at 0 mm", "liver", OTHER)]["mean"]) == pytest.approx(0.5)

    report = json.loads((out_dir / "comparison.json").read_text())
    assert report["dataset"] == DATASET and report["baseline"] == BASELINE
    assert report["trainers"][OTHER]["folds_used"] == [0]
    assert report["trainers"][OTHER]["folds_missing"] == {"1": "not trained (no fold folder)"}
    assert report["cases_compared"] == COMMON_CASES
    assert report["dropped_cases"][BASELINE] == ["case_06", "case_07", "case_08"]
    spleen = next(r for r in report["metrics"]["Dice"] if r["class_name"] == "spleen")
    assert spleen["n_cases"] == 5
    assert spleen["trainers"][BASELINE]["mean"] == pytest.approx(expected["2 spleen"]["mean"][0])
    assert spleen["vs_baseline"][OTHER]["p_value_wilcoxon"] == pytest.approx(expected["2 spleen"]["p"])
    assert report["per_case"]["Dice"][BASELINE]["case_04"]["2"] is None  # NaN written as null
    assert report["per_case"]["NSD"][OTHER]["case_00"]["1"] == pytest.approx(0.5)

    png = (out_dir / "boxplot.png").read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(str(out_dir / "boxplot.png")).ndim == 3  # decodes as an image


def test_compare_cli_unknown_trainer_names_the_folder_searched(nnunet_dirs, tmp_path):
    completed = _compare(nnunet_dirs["env"], "-d", DATASET, "-c", "2d", "--trainers", BASELINE, "nnUNetTrainerTypo",
                         "-o", str(tmp_path / "out"))
    assert completed.returncode != 0
    searched = nnunet_dirs["results"] / DATASET / "nnUNetTrainerTypo__nnUNetPlans__2d"
    assert str(searched) in completed.stderr
    assert "nnUNetv2_train 1 2d FOLD -tr nnUNetTrainerTypo -p nnUNetPlans" in completed.stderr
    assert f"{BASELINE}__nnUNetPlans__2d" in completed.stderr  # what does exist, to spot the typo
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------------

def _square(rows: slice, cols: slice, shape=(10, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def test_nsd_two_squares_offset_by_one_pixel():
    # Reference: 4x4 square rows 2-5, cols 2-5; prediction: the same shifted one column right (cols 3-6).
    # Each surface has 16 - 4 interior = 12 pixels. Shared surface pixels: rows 2 and 5 at cols 3-5 = 6
    # ((3,5),(4,5) are reference surface but prediction interior). Tolerance 0: (6 + 6) / 24 = 0.5.
    # Tolerance 1 mm: every surface pixel has a pixel of the other surface at distance 1 -> 1.0.
    ref, pred = _square(slice(2, 6), slice(2, 6)), _square(slice(2, 6), slice(3, 7))
    assert normalized_surface_distance(pred, ref, (1.0, 1.0), 0.0) == pytest.approx(0.5)
    assert normalized_surface_distance(pred, ref, (1.0, 1.0), 1.0) == pytest.approx(1.0)
    # Columns 2 mm apart: the column-6 pixels of the prediction and column-2 pixels of the reference (4 each) are now
    # 2 mm from the other surface, while (3,3),(4,3) still reach rows 2/5 at 1 mm: (8 + 8) / 24 within 1 mm.
    assert normalized_surface_distance(pred, ref, (1.0, 2.0), 1.0) == pytest.approx(2 / 3)
    assert normalized_surface_distance(pred, ref, (1.0, 2.0), 2.0) == pytest.approx(1.0)
    # A single-slice volume is measured in 2D (its slice is not all surface).
    assert normalized_surface_distance(pred[None], ref[None], (5.0, 1.0, 1.0), 0.0) == pytest.approx(0.5)


def test_nsd_3d_cubes_and_empty_masks():
    # 4x4x4 cubes shifted by one voxel along x: 56 surface voxels each; shared: the 12 boundary voxels of each of the
    # 3 overlapping x-slices = 36, so NSD at 0 mm = 72 / 112.
    ref, pred = np.zeros((8, 8, 10), bool), np.zeros((8, 8, 10), bool)
    ref[2:6, 2:6, 2:6] = True
    pred[2:6, 2:6, 3:7] = True
    assert normalized_surface_distance(pred, ref, (1, 1, 1), 0) == pytest.approx(72 / 112)
    assert normalized_surface_distance(pred, ref, (1, 1, 1), 1) == pytest.approx(1.0)
    empty = np.zeros_like(ref)
    assert math.isnan(normalized_surface_distance(empty, empty, (1, 1, 1), 1))
    assert normalized_surface_distance(empty, ref, (1, 1, 1), 1) == 0.0


def test_paired_wilcoxon_p():
    assert paired_wilcoxon_p([0.9, 0.8, 0.7], [0.9, 0.8, 0.7]) == 1.0
    assert math.isnan(paired_wilcoxon_p([], []))
    base, other = [0.80, 0.82, 0.78, 0.85, 0.81], [0.85, 0.86, 0.84, 0.88, 0.80]
    assert paired_wilcoxon_p(base, other) == pytest.approx(wilcoxon(other, base).pvalue)


def test_case_identifier_and_class_keys(tmp_path):
    assert case_identifier("/a/b/liver_001.nii.gz") == "liver_001"
    assert case_identifier("/a/b/img.7.png", ".png") == "img.7"
    assert parse_class_key("2") == (2,) and parse_class_key("(1, 2)") == (1, 2) and parse_class_key("(3,)") == (3,)
    # region-based dataset.json: summary.json keys are the regions' tuples
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3],
                                                   "enhancing": 3, "ignore": 4}}))
    names = read_label_names(str(dataset_json))
    assert [class_display_name(k, names) for k in ("(1, 2, 3)", "(2, 3)", "(3,)", "3", "7")] == \
        ["whole tumour", "core", "enhancing", "enhancing", "7"]


def test_compare_metric_excludes_nan_pairs_and_averages_defined_classes():
    per_case = {"A": {"c1": {"1": 0.5, "2": NAN}, "c2": {"1": 0.7, "2": 0.9}},
                "B": {"c1": {"1": 0.6, "2": NAN}, "c2": {"1": 0.7, "2": 0.5}}}
    rows = {r.class_key: r for r in compare_metric(per_case, ["A", "B"], ["c1", "c2"], ["1", "2"],
                                                   {"1": "one", "2": "two"})}
    assert rows["2"].case_ids == ["c2"] and rows["2"].diff_to_baseline["B"] == pytest.approx(-0.4)
    # mean row: c1 only has class 1 (class 2 is NaN for both), c2 averages both classes
    assert rows["mean"].values["A"] == pytest.approx([0.5, 0.8])
    assert rows["mean"].values["B"] == pytest.approx([0.6, 0.6])
    assert rows["1"].mean["B"] == pytest.approx(0.65)
    assert rows["1"].std["A"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
