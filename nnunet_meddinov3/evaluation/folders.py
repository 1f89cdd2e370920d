"""nnU-Net's result folders as the comparison reads them: per-case Dice of each fold's ``validation/summary.json``,
label names from ``dataset.json``, and the messages that say what is missing and how to make it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

DEFAULT_FOLDS = (0, 1, 2, 3, 4)


class CompareError(RuntimeError):
    """A problem the user can fix (missing results, unknown dataset, ...); the CLI prints it without a traceback."""


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


def first_existing(paths: list[str | None]) -> str | None:
    return next((p for p in paths if p and os.path.isfile(p)), None)


def read_file_ending(dataset_json_file: str | None) -> str | None:
    """dataset.json's ``file_ending`` (e.g. ``.nii.gz``); None without a file."""
    if not dataset_json_file:
        return None
    with open(dataset_json_file) as f:
        return json.load(f).get("file_ending")
