"""The trained model to predict with: its nnUNetv2_train output folder, folds, checkpoints and dataset.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnunet_meddinov3.inference.report import PredictError, error_reason
from nnunet_meddinov3.nnunet_checkpoints import CHECKPOINT_ORDER, unreadable_reason


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
        trained = _trained_models(folder.parent)
        raise PredictError(f"model folder not found: {folder}\n  train it first: {train}  (FOLD = 0-4 or all)"
                           + (f"\n  trained models of this dataset: {', '.join(trained)}" if trained else ""))
    return folder


def _trained_models(dataset_folder: Path) -> list[str]:
    # a failed or interrupted run leaves a folder without checkpoints: not a trained model
    if not dataset_folder.is_dir():
        return []
    return sorted(p.name for p in dataset_folder.iterdir()
                  if p.is_dir() and "__" in p.name and any(p.glob("fold_*/checkpoint_*.pth")))


def read_dataset_json(model_folder: Path) -> tuple[str, int]:
    """(file ending, number of input channels) of the model's dataset.json."""
    try:
        dataset_json = json.loads((model_folder / "dataset.json").read_text())
        file_ending = dataset_json["file_ending"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PredictError(f"{model_folder / 'dataset.json'} is not an nnU-Net dataset.json with a file_ending "
                           f"({error_reason(e)})") from None
    return file_ending, len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))


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
