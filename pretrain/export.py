"""Export a pretraining run's teacher backbone to the project's checkpoint format.

The EMA teacher (the network DINOv3 evaluates and releases) without its heads is written as
safetensors + the JSON header of :mod:`nnunet_meddinov3.checkpoints.format`: architecture,
intensity preset, resolution, stage history, data manifest hash, licence and citation. By
default the file goes to ``$MEDDINOV3_CACHE/exports/NAME.safetensors``, where the weights
registry lists it as ``NAME``, so the trainer fine-tunes from it by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nnunet_meddinov3.checkpoints.format import (
    DINOV3_CITATION,
    MEDDINOV3_CITATION,
    CheckpointMetadata,
    file_sha256,
    require_safetensors_suffix,
    write_checkpoint,
)
from nnunet_meddinov3.checkpoints.keys import PATCH_EMBED_KEY
from nnunet_meddinov3.checkpoints.loading import load_encoder_weights
from nnunet_meddinov3.checkpoints.registry import cache_dir
from nnunet_meddinov3.network.encoder import DINOv3Encoder

from .configs import config_from_dict
from .engine.checkpoint import read_training_checkpoint
from .model import encoder_config, encoder_state_from_training_checkpoint

# Weights trained from scratch by this project carry the project's licence (pyproject.toml).
PROJECT_LICENCE = "Apache-2.0 (nnunet-meddinov3; pretrained from scratch, no third-party weights)"
CITATION = f"{MEDDINOV3_CITATION}; {DINOV3_CITATION}"
EXPORT_CHANNELS = 3  # the format stores RGB patch-embed kernels; loading adapts them to any channel count


def default_export_path(name: str) -> Path:
    """``$MEDDINOV3_CACHE/exports/NAME.safetensors``: a registry name once written."""
    return cache_dir() / "exports" / f"{name}.safetensors"


def rgb_patch_embed(kernel: torch.Tensor) -> torch.Tensor:
    """(D, 1, p, p) gray kernel -> (D, 3, p, p) whose channel sum is the gray kernel.

    The loader maps RGB kernels to C channels as ``sum / C`` per channel, so a 1-channel
    encoder gets the trained kernel back and a gray image repeated to RGB gives the same
    features as the gray image.
    """
    if kernel.shape[1] == EXPORT_CHANNELS:
        return kernel
    if kernel.shape[1] != 1:
        raise ValueError(f"cannot export a {kernel.shape[1]}-channel patch embedding")
    return (kernel / EXPORT_CHANNELS).repeat(1, EXPORT_CHANNELS, 1, 1)


def export_run(run_or_checkpoint: str | os.PathLike, name: str | None = None,
               output: str | os.PathLike | None = None) -> tuple[Path, CheckpointMetadata]:
    """Export the teacher backbone of a run folder's latest checkpoint (or of a checkpoint file).

    Written to ``output`` if given, else to :func:`default_export_path` of ``name`` (default:
    the run folder's name). Returns the path and the metadata as written.
    """
    if output is not None:
        require_safetensors_suffix(output)  # before reading the run, which can take a while
    state = read_training_checkpoint(run_or_checkpoint)
    checkpoint = Path(state["path"])
    run_dir = checkpoint.parent.parent
    config = config_from_dict(state["config"])
    record = dict(state["stage_record"], iterations=state["iteration"])
    provenance = state["provenance"]

    weights = encoder_state_from_training_checkpoint(state)
    weights[PATCH_EMBED_KEY] = rgb_patch_embed(weights[PATCH_EMBED_KEY])
    # the teacher runs without drop path; that is the architecture a fine-tuning run rebuilds
    architecture = encoder_config(config.model, 0.0).to_dict()
    metadata = CheckpointMetadata(
        architecture=architecture,
        intensity=dict(state["intensity"]),
        in_channels=EXPORT_CHANNELS,
        pretraining_resolution=max(config.crops.global_sizes),
        stages=list(state["history"]) + [record],
        data_manifest_sha256=record.get("data_manifest_sha256"),
        licence=provenance.get("licence") or PROJECT_LICENCE,
        citation=CITATION,
        source={
            "file": checkpoint.name,
            "sha256": file_sha256(checkpoint),
            "layout": "meddinov3_pretrain_checkpoint",
            "run": run_dir.name,
            "iteration": int(state["iteration"]),
            "start_weights": provenance.get("start_weights"),
            **({"distilled_from": provenance["teacher"]} if provenance.get("teacher") else {}),
        },
    )
    path = Path(output) if output is not None else default_export_path(name or run_dir.name)
    written = write_checkpoint(path, weights, metadata)
    return path, written


def teacher_encoder(run_or_checkpoint: str | os.PathLike):
    """The EMA teacher's backbone of a run folder's latest checkpoint (or of a checkpoint file), as a
    1-channel DINOv3Encoder in eval mode: what an export of it would give, without writing a file."""
    state = read_training_checkpoint(run_or_checkpoint)
    config = config_from_dict(state["config"])
    encoder = DINOv3Encoder(encoder_config(config.model, 0.0), in_channels=1)
    load_encoder_weights(encoder, encoder_state_from_training_checkpoint(state), name=f"'{state['path']}'")
    return encoder.eval()
