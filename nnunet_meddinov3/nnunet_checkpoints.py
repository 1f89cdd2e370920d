"""Reading nnU-Net's own checkpoints (``checkpoint_final/latest/best.pth``) without trusting them to be whole.

Fine-tuning (``--c``, training/crash_safety.py), LoRA export and ``meddinov3 predict`` read them; a file
cut short by a killed write or a full disk is a :class:`CheckpointUnreadable` that names it and says why,
never a traceback from deep inside ``torch.load``. Imports nothing from nnU-Net.
"""
from __future__ import annotations

import os

import torch

from nnunet_meddinov3.durable_files import file_kind

# nnU-Net's own order for --c (nnunetv2/run/run_training.py, maybe_load_checkpoint): newest first
CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class CheckpointUnreadable(RuntimeError):
    """A checkpoint file that cannot be read; the message names it and says why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path} cannot be read ({reason}): it was probably cut short by a killed write or a "
                         f"full disk")


def first_line(error: BaseException) -> str:
    """``Type: first non-empty line of the message``: torch's errors run over many lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def read_checkpoint_lazily(path: str) -> dict:
    """An nnU-Net checkpoint's contents with its tensors memory-mapped (a zip file) or read whole (the
    legacy format); :class:`CheckpointUnreadable` if it is empty, truncated or not an nnU-Net checkpoint.
    A truncated zip has lost its central directory, which sits at the end: the cheap memory-mapped open
    already fails on it."""
    try:
        empty = os.path.getsize(path) == 0
        kind = file_kind(path)
    except OSError as e:
        raise CheckpointUnreadable(path, first_line(e)) from None
    if empty:
        raise CheckpointUnreadable(path, "empty file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=kind == "zip")
    except Exception as e:  # torch raises RuntimeError, pickle's errors, EOFError, ... depending on the damage
        raise CheckpointUnreadable(path, first_line(e)) from None
    if not isinstance(checkpoint, dict) or not {"network_weights", "current_epoch"} <= checkpoint.keys():
        raise CheckpointUnreadable(path, "not an nnU-Net checkpoint: no network_weights / current_epoch")
    return checkpoint


def unreadable_reason(path: str) -> str | None:
    """Why ``path`` cannot be read as a checkpoint, or None if it can."""
    try:
        read_checkpoint_lazily(path)
    except CheckpointUnreadable as e:
        return e.reason
    return None
