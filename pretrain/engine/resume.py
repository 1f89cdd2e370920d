"""Where a stage starts: a fresh run, or the newest readable checkpoint of ``--resume``, and the
per-process random state a fresh start gets."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)

# Settings a resumed run may change without changing what it computes.
VOLATILE_KEYS = frozenset({
    "train.max_iterations", "train.progress_bar", "data.num_workers", "debug.inject_nan_at_iteration",
    "train.distributed_timeout_minutes", "debug.cache_build_delay_s", "debug.checkpoint_write_delay_s",
})


def starting_state(run_dir: Path, resume: bool, is_main: bool) -> tuple[Path | None, dict | None]:
    """(checkpoint, state) to resume from, or (None, None) for a fresh start.

    Checkpoints without ``--resume`` are an error (a second run must not overwrite them); the
    temporary files of killed checkpoint writes are removed; an unreadable newest checkpoint gives
    way to the previous one, with a warning; ``--resume`` with nothing to resume from says so."""
    if ckpt.latest_checkpoint(run_dir) is not None and not resume:
        raise FileExistsError(f"'{run_dir}' already has checkpoints; pass --resume to continue it, "
                              "or choose another --output")
    if is_main:
        ckpt.remove_stale_checkpoint_temporaries(run_dir)
    if not resume:
        return None, None
    path, state = ckpt.read_newest_readable(run_dir, set_aside=is_main)
    if state is None and is_main:
        logger.warning("--resume: '%s' has no checkpoint to resume from; starting at iteration 0",
                       ckpt.checkpoint_dir(run_dir))
    return path, state


def changed_settings(now: dict, saved: dict) -> list[str]:
    """Dotted keys whose value differs between two config dicts, volatile ones left out."""
    now, saved = _flatten(now), _flatten(saved)
    return [k for k, v in now.items() if k not in VOLATILE_KEYS and saved.get(k) != v]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "intensity":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def seed_process(seed: int, rank: int) -> None:
    """Per-process randomness (drop path) that differs between ranks; a resume restores it instead."""
    process_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(process_seed)
    np.random.seed(process_seed)
    random.seed(process_seed)
