"""Compare nnU-Net trainers on their cross-validation results: per-class Dice (and optionally NSD) with paired
Wilcoxon signed-rank tests against a baseline trainer.

Everything is read from the folders nnU-Net itself writes, nothing else is needed:

* metrics:     ``$nnUNet_results/DatasetXXX_Name/{trainer}__{plans}__{configuration}/fold_N/validation/summary.json``
  (``compute_metrics_on_folder``: ``metric_per_case`` -> ``metrics`` -> class key (``"1"`` or a region
  ``"(1, 2)"``) -> ``Dice``; Dice is NaN when reference and prediction are both empty)
* label names: ``dataset.json`` that nnU-Net copies next to the folds (``labels``: name -> label or region)
* for NSD:     predictions ``fold_N/validation/<case><file_ending>`` and references
  ``$nnUNet_preprocessed/DatasetXXX_Name/gt_segmentations/<case><file_ending>``

The first trainer is the baseline. Cases are matched by case identifier across trainers; a value that is NaN for
any trainer removes that case from that class only, so every mean, difference and test is over the same cases.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

DICE = "Dice"
NSD = "NSD"
MEAN_ROW_KEY = "mean"
DEFAULT_FOLDS = (0, 1, 2, 3, 4)


class CompareError(RuntimeError):
    """A problem the user can fix (missing results, unknown dataset, ...); the CLI prints it without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Reading nnU-Net's result folders
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class CaseResult:
    case_id: str
    fold: int
    fold_dir: str
    dice: dict[str, float]  # class key -> Dice (NaN: reference and prediction empty)
    prediction_file: str  # as recorded in summary.json (may point to another machine)
    reference_file: str


@dataclass
class TrainerResults:
    trainer: str
    folder: str
    folds_used: list[int]
    folds_missing: dict[int, str]  # fold -> why it is missing
    cases: dict[str, CaseResult]  # case id -> result
    notes: list[str] = field(default_factory=list)


def trainer_folder(results_dataset_dir: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's output folder of one trainer."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    return os.path.join(results_dataset_dir, convert_trainer_plans_config_to_identifier(trainer, plans, configuration))


def case_identifier(file_name: str, file_ending: str | None = None) -> str:
    """File name without folder and extension; ``file_ending`` (dataset.json's, e.g. ``.nii.gz``) wins if it fits."""
    name = os.path.basename(file_name)
    if file_ending and name.endswith(file_ending):
        return name[: -len(file_ending)]
    for double_ending in (".nii.gz", ".seg.nrrd"):  # os.path.splitext would only strip the last part
        if name.endswith(double_ending):
            return name[: -len(double_ending)]
    return os.path.splitext(name)[0]


def _float_or_nan(value) -> float:
    # nnU-Net writes NaN as the JSON literal NaN; other writers may use null.
    return float("nan") if value is None else float(value)


def _why_fold_missing(fold_dir: str) -> str:
    if not os.path.isdir(fold_dir):
        return "not trained (no fold folder)"
    if not os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
        return "training not finished (no checkpoint_final.pth)"
    return "trained but not validated (no validation/summary.json; rerun nnUNetv2_train with --val)"


def load_trainer_results(results_dataset_dir: str, trainer: str, plans: str, configuration: str,
                         folds=DEFAULT_FOLDS, file_ending: str | None = None) -> TrainerResults:
    """Per-case Dice of every available fold of one trainer. Raises CompareError if no fold has results."""
    folder = trainer_folder(results_dataset_dir, trainer, plans, configuration)
    result = TrainerResults(trainer, folder, [], {}, {})
    for fold in folds:
        fold_dir = os.path.join(folder, f"fold_{fold}")
        summary_file = os.path.join(fold_dir, "validation", "summary.json")
        if not os.path.isfile(summary_file):
            result.folds_missing[fold] = _why_fold_missing(fold_dir)
            continue
        with open(summary_file) as f:
            summary = json.load(f)
        result.folds_used.append(fold)
        for entry in summary["metric_per_case"]:
            case_id = case_identifier(entry["prediction_file"], file_ending)
            if case_id in result.cases:  # only possible with hand-made splits; keep the first fold's result
                result.notes.append(f"{trainer}: case {case_id} is in fold {result.cases[case_id].fold} and "
                                    f"fold {fold}; using fold {result.cases[case_id].fold}")
                continue
            dice = {key: _float_or_nan(metrics.get("Dice")) for key, metrics in entry["metrics"].items()}
            result.cases[case_id] = CaseResult(case_id, fold, fold_dir, dice, entry["prediction_file"],
                                               entry["reference_file"])
    if not result.folds_used:
        raise CompareError(_no_results_message(results_dataset_dir, trainer, plans, configuration, folds))
    return result


def _no_results_message(results_dataset_dir: str, trainer: str, plans: str, configuration: str, folds) -> str:
    folder = trainer_folder(results_dataset_dir, trainer, plans, configuration)
    exists = "" if os.path.isdir(folder) else " (this folder does not exist)"
    lines = [f"no cross-validation results for trainer {trainer} (plans {plans}, configuration {configuration}).",
             f"Looked for fold_N/validation/summary.json, N in {' '.join(map(str, folds))}, in",
             f"  {folder}{exists}"]
    # A typo in the trainer or plans name is the usual cause: show what is there.
    existing = os.listdir(results_dataset_dir) if os.path.isdir(results_dataset_dir) else []
    others = sorted(d for d in existing if d.endswith(f"__{configuration}")
                    and os.path.isdir(os.path.join(results_dataset_dir, d)))
    if others:
        lines.append(f"Result folders for configuration {configuration} that do exist: {', '.join(others)}")
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    dataset_id = convert_dataset_name_to_id(os.path.basename(os.path.normpath(results_dataset_dir)))
    lines.append(f"Create them with: nnUNetv2_train {dataset_id} {configuration} FOLD -tr {trainer} -p {plans}"
                 f"  (FOLD = {' '.join(map(str, folds))})")
    return "\n".join(lines)


def parse_class_key(key: str) -> tuple[int, ...]:
    """``"2"`` -> (2,), ``"(1, 2)"`` -> (1, 2): the labels a summary.json class key (label or region) covers."""
    return tuple(int(part) for part in key.strip("()").split(",") if part.strip())


def read_label_names(dataset_json_file: str | None) -> dict[tuple[int, ...], str]:
    """dataset.json ``labels`` (name -> label or region) as labels-tuple -> name; {} without a file."""
    if not dataset_json_file or not os.path.isfile(dataset_json_file):
        return {}
    with open(dataset_json_file) as f:
        labels = json.load(f).get("labels", {})
    names = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        key = tuple(sorted(value)) if isinstance(value, (list, tuple)) else (int(value),)
        names[key] = name
    return names


def class_display_name(key: str, label_names: dict[tuple[int, ...], str]) -> str:
    return label_names.get(tuple(sorted(parse_class_key(key))), key)


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------

def paired_wilcoxon_p(baseline: list[float], other: list[float]) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value (scipy defaults); 1.0 when all differences are zero
    (scipy cannot rank an all-zero sample and, depending on the version, warns or returns NaN), NaN without cases."""
    from scipy.stats import wilcoxon

    differences = np.asarray(other, dtype=float) - np.asarray(baseline, dtype=float)
    if differences.size == 0:
        return float("nan")
    if np.all(differences == 0):
        return 1.0
    return float(wilcoxon(other, baseline).pvalue)


@dataclass
class ClassRow:
    """One class (or the foreground mean) of one metric: per-trainer mean/std over the paired cases."""
    class_key: str  # "1", "(1, 2)" or MEAN_ROW_KEY
    class_name: str
    case_ids: list[str]  # the cases every trainer has a value for
    values: dict[str, list[float]]  # trainer -> per-case values, in case_ids order
    mean: dict[str, float]
    std: dict[str, float]  # sample std (ddof=1); NaN for a single case
    diff_to_baseline: dict[str, float]  # non-baseline trainer -> its mean - baseline mean
    p_value: dict[str, float]  # non-baseline trainer -> paired Wilcoxon p vs baseline

    @property
    def n_cases(self) -> int:
        return len(self.case_ids)


def _summarise(class_key: str, class_name: str, case_ids: list[str], values: dict[str, list[float]],
               trainers: list[str]) -> ClassRow:
    baseline = trainers[0]
    mean = {t: float(np.mean(values[t])) if case_ids else float("nan") for t in trainers}
    std = {t: float(np.std(values[t], ddof=1)) if len(case_ids) > 1 else float("nan") for t in trainers}
    diff = {t: mean[t] - mean[baseline] for t in trainers[1:]}
    p = {t: paired_wilcoxon_p(values[baseline], values[t]) for t in trainers[1:]}
    return ClassRow(class_key, class_name, case_ids, values, mean, std, diff, p)


def compare_metric(per_case: dict[str, dict[str, dict[str, float]]], trainers: list[str], case_ids: list[str],
                   class_keys: list[str], class_names: dict[str, str]) -> list[ClassRow]:
    """Rows for each class plus a foreground-mean row from ``per_case[trainer][case][class_key]``.

    A case enters a class only if every trainer has a finite value (NaN Dice = empty reference and prediction).
    The mean row averages, per case, the foreground classes that entered for that case, then summarises over cases
    like a class (so it can be tested pairwise; it can differ slightly from nnU-Net's mean of class means).
    """
    def value(trainer, case, key):
        return per_case[trainer][case].get(key, float("nan"))

    def defined_for_all(case, key):
        return all(math.isfinite(value(t, case, key)) for t in trainers)

    rows = []
    for key in class_keys:
        cases = [c for c in case_ids if defined_for_all(c, key)]
        rows.append(_summarise(key, class_names[key], cases, {t: [value(t, c, key) for c in cases] for t in trainers},
                               trainers))

    foreground = [k for k in class_keys if parse_class_key(k) != (0,)]
    mean_cases, mean_values = [], {t: [] for t in trainers}
    for case in case_ids:
        keys = [k for k in foreground if defined_for_all(case, k)]
        if not keys:
            continue
        mean_cases.append(case)
        for t in trainers:
            mean_values[t].append(float(np.mean([value(t, case, k) for k in keys])))
    rows.append(_summarise(MEAN_ROW_KEY, "mean (foreground)", mean_cases, mean_values, trainers))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Normalised surface distance
# ----------------------------------------------------------------------------------------------------------------

def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face-neighbour outside it (the image border counts as outside)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    return mask & ~binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), border_value=0)


def normalized_surface_distance(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing, tolerance_mm: float) -> float:
    """Normalised surface distance (surface Dice, Nikolov et al. 2021) of two binary masks, 2D or 3D.

    NSD = (#pred surface voxels within ``tolerance_mm`` of the ref surface + #ref surface voxels within
    ``tolerance_mm`` of the pred surface) / (#pred surface voxels + #ref surface voxels), distances measured with
    ``spacing`` (mm per voxel along each array axis) and "within" meaning <= tolerance. Surface voxels are mask voxels
    with a face-neighbour outside the mask, each counted once (as MONAI's ``compute_surface_dice``; DeepMind's
    surface-distance weights surface elements by area instead, which differs slightly on anisotropic grids).

    Axes of length 1 are dropped first, so a single-slice volume (nnU-Net's 2D NIfTI) is measured in 2D instead of
    being all surface. Returns NaN if both masks are empty and 0.0 if exactly one is.
    """
    from scipy.ndimage import distance_transform_edt

    pred_mask, ref_mask = np.asarray(pred_mask, dtype=bool), np.asarray(ref_mask, dtype=bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} != reference shape {ref_mask.shape}")
    if len(spacing) != pred_mask.ndim:
        raise ValueError(f"{len(spacing)} spacings for a {pred_mask.ndim}D mask")
    kept_axes = [axis for axis, size in enumerate(pred_mask.shape) if size > 1]
    pred_mask = pred_mask.reshape([pred_mask.shape[a] for a in kept_axes])
    ref_mask = ref_mask.reshape(pred_mask.shape)
    spacing = [float(spacing[a]) for a in kept_axes]

    pred_any, ref_any = pred_mask.any(), ref_mask.any()
    if not pred_any and not ref_any:
        return float("nan")
    if not pred_any or not ref_any:
        return 0.0

    # Distance transforms over a whole CT volume are slow; the bounding box of both masks plus one background voxel
    # gives the same surfaces (erosion sees the same neighbours) and holds every surface voxel, so distances match.
    union = np.argwhere(pred_mask | ref_mask)
    low = np.maximum(union.min(axis=0) - 1, 0)
    high = np.minimum(union.max(axis=0) + 2, pred_mask.shape)
    crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    pred_surface, ref_surface = _surface(pred_mask[crop]), _surface(ref_mask[crop])

    # distance_transform_edt measures to the nearest zero, so invert the surface to measure to it.
    distance_to_ref = distance_transform_edt(~ref_surface, sampling=spacing)
    distance_to_pred = distance_transform_edt(~pred_surface, sampling=spacing)
    pred_close = np.count_nonzero(distance_to_ref[pred_surface] <= tolerance_mm)
    ref_close = np.count_nonzero(distance_to_pred[ref_surface] <= tolerance_mm)
    return (pred_close + ref_close) / (np.count_nonzero(pred_surface) + np.count_nonzero(ref_surface))


def _read_segmentation(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Label array in SimpleITK's (z, y, x) order with the spacing in the same order."""
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing())[::-1]


def _first_existing(paths: list[str | None]) -> str | None:
    return next((p for p in paths if p and os.path.isfile(p)), None)


def compute_nsd(trainers: list[TrainerResults], case_ids: list[str], class_keys: list[str], tolerance_mm: float,
                gt_segmentations_dir: str | None) -> dict[str, dict[str, dict[str, float]]]:
    """NSD per trainer, case and class from the validation predictions and nnU-Net's gt_segmentations.

    Files are looked up where nnU-Net keeps them under the current environment first (summary.json holds absolute
    paths from the machine that trained), then at the recorded path.
    """
    nsd = {t.trainer: {} for t in trainers}
    for case_id in case_ids:
        recorded_reference = trainers[0].cases[case_id].reference_file
        candidates = [os.path.join(gt_segmentations_dir, os.path.basename(recorded_reference))
                      if gt_segmentations_dir else None, recorded_reference]
        reference_path = _first_existing(candidates)
        if reference_path is None:
            raise CompareError(f"reference segmentation of case {case_id} not found; looked at "
                               f"{', '.join(p for p in candidates if p)} (is nnUNet_preprocessed set?)")
        reference, spacing = _read_segmentation(reference_path)
        for t in trainers:
            case = t.cases[case_id]
            candidates = [os.path.join(case.fold_dir, "validation", os.path.basename(case.prediction_file)),
                          case.prediction_file]
            prediction_path = _first_existing(candidates)
            if prediction_path is None:
                raise CompareError(f"{t.trainer}: prediction of case {case_id} not found; looked at "
                                   f"{', '.join(candidates)}")
            prediction, _ = _read_segmentation(prediction_path)
            if prediction.shape != reference.shape:
                raise CompareError(f"{t.trainer}: prediction {prediction_path} has shape {prediction.shape}, "
                                   f"reference {reference_path} has {reference.shape}")
            nsd[t.trainer][case_id] = {
                key: normalized_surface_distance(np.isin(prediction, parse_class_key(key)),
                                                 np.isin(reference, parse_class_key(key)), spacing, tolerance_mm)
                for key in class_keys}
    return nsd


# ----------------------------------------------------------------------------------------------------------------
# The whole comparison
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    dataset_name: str
    configuration: str
    plans: str
    trainers: list[TrainerResults]  # baseline first
    case_ids: list[str]  # cases every trainer has
    dropped_cases: dict[str, list[str]]  # trainer -> its cases that not every trainer has
    class_names: dict[str, str]  # class key -> name from dataset.json
    tables: dict[str, list[ClassRow]]  # DICE / NSD -> rows
    per_case: dict[str, dict[str, dict[str, dict[str, float]]]]  # metric -> trainer -> case -> class key -> value
    nsd_tolerance_mm: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainer_names(self) -> list[str]:
        return [t.trainer for t in self.trainers]


def compare_trainers(dataset: str, configuration: str, trainers: list[str], plans: str = "nnUNetPlans",
                     folds=DEFAULT_FOLDS, nsd_tolerance_mm: float | None = None,
                     progress: Callable[[str], None] | None = None) -> Comparison:
    """Compare ``trainers`` (the first is the baseline) on their cross-validation results of one dataset."""
    if len(set(trainers)) != len(trainers):
        raise CompareError(f"a trainer is named twice: {' '.join(trainers)}")
    if not os.environ.get("nnUNet_results"):
        raise CompareError("nnUNet_results is not set: it is the folder nnUNetv2_train wrote its results to "
                           "(see `meddinov3 env`)")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise CompareError(str(e)) from None
    results_dataset_dir = os.path.join(os.environ["nnUNet_results"], dataset_name)
    preprocessed = os.environ.get("nnUNet_preprocessed")

    # dataset.json: nnU-Net copies it into every trainer folder; the preprocessed one is the fallback.
    dataset_json_file = _first_existing(
        [os.path.join(trainer_folder(results_dataset_dir, t, plans, configuration), "dataset.json") for t in trainers]
        + [os.path.join(preprocessed, dataset_name, "dataset.json") if preprocessed else None])
    file_ending = None
    if dataset_json_file:
        with open(dataset_json_file) as f:
            file_ending = json.load(f).get("file_ending")
    label_names = read_label_names(dataset_json_file)

    results = [load_trainer_results(results_dataset_dir, t, plans, configuration, folds, file_ending)
               for t in trainers]
    notes = [note for r in results for note in r.notes]

    case_sets = [set(r.cases) for r in results]
    common = set.intersection(*case_sets)
    if not common:
        raise CompareError("no case is present in the results of every trainer: "
                           + "; ".join(f"{r.trainer} has {len(r.cases)} cases (folds "
                                       f"{' '.join(map(str, r.folds_used))})" for r in results))
    case_ids = sorted(common)
    dropped = {r.trainer: sorted(set(r.cases) - common) for r in results}

    # Classes come from summary.json (nnU-Net writes foreground labels or regions); compare those all trainers have.
    class_sets = [{k for case in r.cases.values() for k in case.dice} for r in results]
    class_keys = sorted(set.intersection(*class_sets), key=parse_class_key)
    if any(s != class_sets[0] for s in class_sets):
        notes.append(f"trainers were evaluated on different classes; comparing only {', '.join(class_keys)}")
    class_names = {k: class_display_name(k, label_names) for k in class_keys}

    names = [r.trainer for r in results]
    per_case = {DICE: {r.trainer: {c: r.cases[c].dice for c in case_ids} for r in results}}
    if nsd_tolerance_mm is not None:
        if progress:
            progress(f"computing NSD at {nsd_tolerance_mm:g} mm for {len(case_ids)} cases x {len(names)} trainers ...")
        per_case[NSD] = compute_nsd(results, case_ids, class_keys, nsd_tolerance_mm,
                                    os.path.join(preprocessed, dataset_name, "gt_segmentations") if preprocessed
                                    else None)
    tables = {metric: compare_metric(values, names, case_ids, class_keys, class_names)
              for metric, values in per_case.items()}
    return Comparison(dataset_name, configuration, plans, results, case_ids, dropped, class_names, tables, per_case,
                      nsd_tolerance_mm, notes)


# ----------------------------------------------------------------------------------------------------------------
# Text, CSV, JSON and PNG output
# ----------------------------------------------------------------------------------------------------------------

def format_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _metric_title(comparison: Comparison, metric: str) -> str:
    return f"NSD at {comparison.nsd_tolerance_mm:g} mm" if metric == NSD else metric


def _align(rows: list[list[str]], left_columns: int) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < left_columns else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows)


def format_table(rows: list[ClassRow], trainers: list[str], title: str) -> str:
    baseline = trainers[0]
    header = ["class", "n"] + trainers
    for t in trainers[1:]:
        header += [f"diff {t}", f"p {t}"] if len(trainers) > 2 else ["diff", "p (Wilcoxon)"]
    lines = [header]
    for row in rows:
        # "1 liver"; just "1" when dataset.json gave no name, and the mean row has no key to show
        name = row.class_name if row.class_name == row.class_key or row.class_key == MEAN_ROW_KEY \
            else f"{row.class_key} {row.class_name}"
        cells = [name, str(row.n_cases)] + [f"{row.mean[t]:.4f} +/- {row.std[t]:.4f}" for t in trainers]
        for t in trainers[1:]:
            cells += [f"{row.diff_to_baseline[t]:+.4f}", format_p(row.p_value[t])]
        lines.append(cells)
    explanation = f"{title}: mean +/- std over cases"
    if len(trainers) > 1:
        explanation += f"; diff = mean - mean of baseline {baseline}, p = paired Wilcoxon signed-rank test"
    return explanation + "\n" + _align(lines, left_columns=1)


def format_report(comparison: Comparison) -> str:
    lines = [f"{comparison.dataset_name}, configuration {comparison.configuration}, plans {comparison.plans}"]
    for r in comparison.trainers:
        line = (f"  {r.trainer}: folds {' '.join(map(str, r.folds_used))} ({len(r.cases)} cases)"
                + (" [baseline]" if r is comparison.trainers[0] else ""))
        lines.append(line)
        folds_by_reason = {}  # one line per reason: "missing folds 2 3 4: not trained" rather than three lines
        for fold, why in r.folds_missing.items():
            folds_by_reason.setdefault(why, []).append(str(fold))
        for why, folds in folds_by_reason.items():
            lines.append(f"    missing fold{'s' if len(folds) > 1 else ''} {' '.join(folds)}: {why}")
    n_dropped = len(set().union(*map(set, comparison.dropped_cases.values())))
    line = f"Cases: {len(comparison.case_ids)} present for every trainer are compared, {n_dropped} dropped"
    if n_dropped:
        line += " (" + ", ".join(f"{t}: {len(c)}" for t, c in comparison.dropped_cases.items() if c) + \
                " not in every trainer's results)"
    lines.append(line)
    lines += [f"Note: {note}" for note in comparison.notes]
    for metric, rows in comparison.tables.items():
        lines += ["", format_table(rows, comparison.trainer_names, _metric_title(comparison, metric))]
    return "\n".join(lines)


def _json_number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x  # NaN is not JSON


def write_csv(comparison: Comparison, path: str) -> None:
    """One row per metric, class and trainer (long format, easy to load into pandas or a spreadsheet)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "class_key", "class_name", "trainer", "n_cases", "mean", "std",
                         "diff_to_baseline", "p_value_wilcoxon"])
        for metric, rows in comparison.tables.items():
            for row in rows:
                for t in comparison.trainer_names:
                    diff, p = row.diff_to_baseline.get(t), row.p_value.get(t)
                    writer.writerow([_metric_title(comparison, metric), row.class_key, row.class_name, t, row.n_cases,
                                     row.mean[t], row.std[t], "" if diff is None else diff, "" if p is None else p])


def comparison_to_dict(comparison: Comparison) -> dict:
    def row_dict(row: ClassRow) -> dict:
        return {"class_key": row.class_key, "class_name": row.class_name, "n_cases": row.n_cases,
                "trainers": {t: {"mean": _json_number(row.mean[t]), "std": _json_number(row.std[t])}
                             for t in comparison.trainer_names},
                "vs_baseline": {t: {"diff": _json_number(row.diff_to_baseline[t]),
                                    "p_value_wilcoxon": _json_number(row.p_value[t])} for t in row.diff_to_baseline}}

    return {
        "dataset": comparison.dataset_name, "configuration": comparison.configuration, "plans": comparison.plans,
        "baseline": comparison.trainer_names[0], "nsd_tolerance_mm": comparison.nsd_tolerance_mm,
        "trainers": {r.trainer: {"folder": r.folder, "folds_used": r.folds_used,
                                 "folds_missing": {str(f): why for f, why in r.folds_missing.items()},
                                 "n_cases": len(r.cases)} for r in comparison.trainers},
        "cases_compared": comparison.case_ids, "dropped_cases": comparison.dropped_cases,
        "notes": comparison.notes,
        "metrics": {metric: [row_dict(row) for row in rows] for metric, rows in comparison.tables.items()},
        "per_case": {metric: {t: {c: {k: _json_number(v) for k, v in classes.items()} for c, classes in cases.items()}
                              for t, cases in trainers.items()} for metric, trainers in comparison.per_case.items()},
    }


def write_json(comparison: Comparison, path: str) -> None:
    with open(path, "w") as f:
        json.dump(comparison_to_dict(comparison), f, indent=2)


def plot_boxplots(comparison: Comparison, path: str) -> None:
    """Per-class box plots of the per-case values (the paired cases of each class), one colour per trainer;
    one panel per metric (Dice, and NSD when computed)."""
    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    trainers = comparison.trainer_names
    colours = [f"C{i % 10}" for i in range(len(trainers))]
    n_classes = len(next(iter(comparison.tables.values())))
    fig = Figure(figsize=(max(6.0, 1.2 * n_classes * len(trainers) ** 0.5 + 2), 4.0 * len(comparison.tables)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(comparison.tables), 1, squeeze=False)[:, 0]
    width = 0.8 / len(trainers)
    for ax, (metric, rows) in zip(axes, comparison.tables.items()):
        for j, (trainer, colour) in enumerate(zip(trainers, colours)):
            positions = [i + (j - (len(trainers) - 1) / 2) * width for i in range(len(rows))]
            # matplotlib cannot draw an empty box; a class no case is defined for gets a NaN placeholder.
            data = [row.values[trainer] or [float("nan")] for row in rows]
            ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True, manage_ticks=False,
                       boxprops={"facecolor": colour, "alpha": 0.6}, medianprops={"color": "black"},
                       flierprops={"markersize": 3})
        ax.set_xticks(range(len(rows)), [row.class_name for row in rows], rotation=30 if len(rows) > 6 else 0)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(_metric_title(comparison, metric))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"{comparison.dataset_name} {comparison.configuration}: per-case values over "
                      f"{len(comparison.case_ids)} cases")
    axes[0].legend(handles=[Patch(facecolor=c, alpha=0.6, label=t) for t, c in zip(trainers, colours)],
                   loc="lower left", fontsize="small")
    fig.savefig(path, dpi=120)


def default_output_dir(comparison: Comparison) -> str:
    return os.path.join(os.environ["nnUNet_results"], comparison.dataset_name,
                        f"compare_{comparison.configuration}_{comparison.plans}")


def write_outputs(comparison: Comparison, output_dir: str | None = None) -> dict[str, str]:
    """comparison.csv, comparison.json and a box plot PNG in ``output_dir`` (default: next to the trainers)."""
    output_dir = output_dir or default_output_dir(comparison)
    os.makedirs(output_dir, exist_ok=True)
    paths = {"csv": os.path.join(output_dir, "comparison.csv"), "json": os.path.join(output_dir, "comparison.json"),
             "png": os.path.join(output_dir, "boxplot.png")}
    write_csv(comparison, paths["csv"])
    write_json(comparison, paths["json"])
    plot_boxplots(comparison, paths["png"])
    return paths
