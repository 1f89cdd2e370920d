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

The steps live beside this module: reading the folders (``folders``), NSD (``surface_distance``), the statistics
(``statistics``), text/CSV/JSON (``report``) and box plots (``plots``).
"""
from __future__ import annotations

import os
from typing import Callable

from nnunet_meddinov3.evaluation.folders import (
    DEFAULT_FOLDS,
    CompareError,
    TrainerResults,
    class_display_name,
    first_existing,
    load_trainer_results,
    parse_class_key,
    read_file_ending,
    read_label_names,
    trainer_folder,
)
from nnunet_meddinov3.evaluation.plots import plot_boxplots
from nnunet_meddinov3.evaluation.report import write_csv, write_json
from nnunet_meddinov3.evaluation.statistics import DICE, NSD, Comparison, compare_metric
from nnunet_meddinov3.evaluation.surface_distance import compute_nsd


def compare_trainers(dataset: str, configuration: str, trainers: list[str], plans: str = "nnUNetPlans",
                     folds=DEFAULT_FOLDS, nsd_tolerance_mm: float | None = None,
                     progress: Callable[[str], None] | None = None) -> Comparison:
    """Compare ``trainers`` (the first is the baseline) on their cross-validation results of one dataset."""
    if len(set(trainers)) != len(trainers):
        raise CompareError(f"a trainer is named twice: {' '.join(trainers)}")
    dataset_name = _dataset_name(dataset)
    results_dataset_dir = os.path.join(os.environ["nnUNet_results"], dataset_name)
    preprocessed = os.environ.get("nnUNet_preprocessed")
    preprocessed_dataset_dir = os.path.join(preprocessed, dataset_name) if preprocessed else None

    # dataset.json: nnU-Net copies it into every trainer folder; the preprocessed one is the fallback.
    dataset_json_file = first_existing(
        [os.path.join(trainer_folder(results_dataset_dir, t, plans, configuration), "dataset.json") for t in trainers]
        + [os.path.join(preprocessed_dataset_dir, "dataset.json") if preprocessed_dataset_dir else None])
    file_ending = read_file_ending(dataset_json_file)
    label_names = read_label_names(dataset_json_file)

    results = [load_trainer_results(results_dataset_dir, t, plans, configuration, folds, file_ending)
               for t in trainers]
    notes = [note for r in results for note in r.notes]
    case_ids, dropped = _common_cases(results)
    class_keys = _common_classes(results, notes)
    class_names = {k: class_display_name(k, label_names) for k in class_keys}

    names = [r.trainer for r in results]
    per_case = {DICE: {r.trainer: {c: r.cases[c].dice for c in case_ids} for r in results}}
    if nsd_tolerance_mm is not None:
        if progress:
            progress(f"computing NSD at {nsd_tolerance_mm:g} mm for {len(case_ids)} cases x {len(names)} trainers ...")
        per_case[NSD] = compute_nsd(results, case_ids, class_keys, nsd_tolerance_mm,
                                    os.path.join(preprocessed_dataset_dir, "gt_segmentations")
                                    if preprocessed_dataset_dir else None)
    tables = {metric: compare_metric(values, names, case_ids, class_keys, class_names)
              for metric, values in per_case.items()}
    return Comparison(dataset_name, configuration, plans, results, case_ids, dropped, class_names, tables, per_case,
                      nsd_tolerance_mm, notes)


def _dataset_name(dataset: str) -> str:
    """``DatasetXXX_Name`` of a dataset id or name, as nnU-Net resolves it."""
    if not os.environ.get("nnUNet_results"):
        raise CompareError("nnUNet_results is not set: it is the folder nnUNetv2_train wrote its results to "
                           "(see `meddinov3 env`)")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise CompareError(str(e)) from None


def _common_cases(results: list[TrainerResults]) -> tuple[list[str], dict[str, list[str]]]:
    """(the cases every trainer has, sorted; trainer -> its cases that not every trainer has)."""
    common = set.intersection(*(set(r.cases) for r in results))
    if not common:
        raise CompareError("no case is present in the results of every trainer: "
                           + "; ".join(f"{r.trainer} has {len(r.cases)} cases (folds "
                                       f"{' '.join(map(str, r.folds_used))})" for r in results))
    return sorted(common), {r.trainer: sorted(set(r.cases) - common) for r in results}


def _common_classes(results: list[TrainerResults], notes: list[str]) -> list[str]:
    # Classes come from summary.json (nnU-Net writes foreground labels or regions); compare those all trainers have.
    class_sets = [{k for case in r.cases.values() for k in case.dice} for r in results]
    class_keys = sorted(set.intersection(*class_sets), key=parse_class_key)
    if any(s != class_sets[0] for s in class_sets):
        notes.append(f"trainers were evaluated on different classes; comparing only {', '.join(class_keys)}")
    return class_keys


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
