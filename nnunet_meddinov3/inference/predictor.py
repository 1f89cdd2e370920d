"""nnU-Net's own predictor, set up and run on the staged files as ``nnUNetv2_predict`` would."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

from nnunet_meddinov3.inference.model_folder import unreadable_checkpoint_note
from nnunet_meddinov3.inference.report import PredictError, error_reason


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


def load_predictor(model_folder: Path, folds: list[int | str], checkpoint: str, device: str, step_size: float,
                   use_mirroring: bool):
    """:func:`make_predictor`, with a PredictError that says which file is wrong when the model cannot load."""
    try:
        return make_predictor(model_folder, folds, checkpoint, device, step_size, use_mirroring)
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
        note = unreadable_checkpoint_note(model_folder, folds, checkpoint)
        raise PredictError(f"cannot load the model in {model_folder} ({error_reason(e)}); it must be a finished "
                           f"nnUNetv2_train output: plans.json, dataset.json and fold_N/{checkpoint}"
                           + (f"\n  {note}" if note else "")) from None


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


def predict_staged(predictor, images_folder: Path, staged_names: list[str], predictions_folder: Path,
                   file_ending: str, num_channels: int, npp: int, nps: int,
                   log: Callable[[str], None]) -> dict[str, str]:
    """Predict every staged case; staged name -> why nnU-Net could not predict it."""
    try:
        run_nnunet(predictor, images_folder, staged_names, predictions_folder, file_ending, num_channels, npp, nps)
        return {}
    except Exception as e:  # one bad case stops nnU-Net's whole batch: find it by predicting one by one
        log(f"nnU-Net's batch prediction failed ({error_reason(e)}); predicting the cases one at a time")
    failures = {}
    for staged_name in staged_names:
        if not (predictions_folder / f"{staged_name}{file_ending}").is_file():
            try:
                run_nnunet(predictor, images_folder, [staged_name], predictions_folder, file_ending,
                           num_channels, 0, 0)
            except Exception as case_error:
                failures[staged_name] = error_reason(case_error)
    return failures
