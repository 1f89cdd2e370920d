"""Training checkpoints: atomic, rotated, and complete enough to resume bit for bit.

A checkpoint (``RUN/checkpoints/checkpoint_<iteration>.pt``, a ``torch.save`` dict of tensors and
plain containers, readable with ``weights_only=True``) holds the student, EMA teacher, Gram
teacher, optimizer, every rank's RNG states (torch, CUDA, NumPy, Python), the head warm-up and
monitor states, the iteration (which is also the data stream position), the config, the stage
history and the provenance (licence, starting weights, data manifest).
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_meddinov3.checkpoints.loading import load_encoder_weights
from nnunet_meddinov3.durable_files import first_readable, remove_stale_temporaries, write_atomically
from nnunet_meddinov3.network.encoder import DINOv3Encoder

from ..model import encoder_state_from_training_checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "nnunet-meddinov3-pretrain/1"
_NAME = re.compile(r"^checkpoint_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    return checkpoint_dir(run_dir) / f"checkpoint_{iteration:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of the run's complete checkpoints, oldest first (temp files are skipped)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path_or_run: str | os.PathLike) -> Path:
    """A checkpoint file, or the latest checkpoint of a run folder."""
    path = Path(path_or_run).expanduser()
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"run folder '{path}' has no checkpoints (expected {checkpoint_dir(path)}/)")
        return latest
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return path


def is_training_checkpoint(path_or_run: str | os.PathLike) -> bool:
    """Whether this is one of our training checkpoints (or a run folder that has one)."""
    path = Path(path_or_run).expanduser()
    if path.is_dir():
        return latest_checkpoint(path) is not None
    return path.is_file() and _NAME.match(path.name) is not None


def _read_file(path: Path) -> dict:
    what = (f"'{path}' is not a pretraining checkpoint of this project ({CHECKPOINT_FORMAT}); give a run folder "
            "(the --output of python -m pretrain train) or one of its checkpoints/checkpoint_*.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch.load raises on a file that is no torch.save of tensors
        raise ValueError(f"{what} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(what)
    state["path"] = str(path)
    return state


def read_training_checkpoint(path_or_run: str | os.PathLike) -> dict:
    """A checkpoint file, or the newest readable checkpoint of a run folder (see :func:`read_newest_readable`)."""
    path = Path(path_or_run).expanduser()
    if path.is_dir():
        found, state = read_newest_readable(path)
        if state is None:
            raise FileNotFoundError(f"run folder '{path}' has no checkpoints (expected {checkpoint_dir(path)}/)")
        return state
    return _read_file(resolve_checkpoint(path))


class UnreadableCheckpoints(RuntimeError):
    """Every checkpoint of a run is unreadable."""


def read_newest_readable(run_dir: str | os.PathLike, set_aside: bool = False) -> tuple[Path | None, dict | None]:
    """(path, state) of the run's newest checkpoint that loads, warning about each newer one that
    does not (a disk error, a file cut by a full disk); (None, None) when the run has none.
    ``set_aside`` renames the unreadable ones to ``*.unreadable`` (one process of a run only), so
    that later starts and pruning do not trip on them again."""
    newest_first = [path for _, path in reversed(list_checkpoints(run_dir))]
    path, state, passed_over = first_readable(newest_first, _read_file)  # whatever torch.load raises on damage
    problems = [(bad, " ".join(str(e).split())[:200] or type(e).__name__) for bad, e in passed_over]
    if path is not None:
        for bad, reason in problems:
            logger.warning("checkpoint %s is unreadable (%s); using the previous one, %s", bad, reason, path.name)
            if set_aside:
                bad.replace(bad.with_name(bad.name + ".unreadable"))
        return path, state
    if problems:
        listed = "; ".join(f"{p.name}: {r}" for p, r in problems)
        raise UnreadableCheckpoints(f"none of the {len(problems)} checkpoint(s) in {checkpoint_dir(run_dir)} can be "
                                    f"read ({listed}); move them away to start again from scratch")
    return None, None


def remove_stale_checkpoint_temporaries(run_dir: str | os.PathLike) -> list[str]:
    """Delete what killed checkpoint writes left behind (call from the one process that writes)."""
    removed = remove_stale_temporaries(checkpoint_dir(run_dir))
    if removed:
        logger.warning("removed %d temporary file(s) of killed checkpoint writes under %s", len(removed),
                       checkpoint_dir(run_dir))
    return removed


def save_checkpoint_file(state: dict, path: Path, delay_s: float = 0.0) -> None:
    """``torch.save`` the state so that the checkpoint is complete or absent (:func:`write_atomically`);
    ``delay_s`` (debug) waits before the rename."""
    write_atomically(path, lambda f: torch.save(state, f), delay_s=delay_s)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints, sparing multiples of ``keep_every``."""
    found = list_checkpoints(run_dir)
    removed = []
    for iteration, path in found[: max(len(found) - keep_last, 0)]:
        if keep_every > 0 and iteration % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# --- RNG states -------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """This process's RNG states as tensors and plain containers (``weights_only``-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- model / optimizer states (plain, DDP or FSDP2) -----------------------------------------------------


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full (unsharded) tensors gathered to CPU: the file does not depend on the number of processes
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(module: nn.Module) -> dict:
    """Full state dict of a plain or FSDP2 module (collective under FSDP2: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_model_state(module: nn.Module, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options())


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options())


def load_gram_teacher(gram_teacher: DINOv3Encoder, source: str | os.PathLike) -> None:
    """Load any earlier checkpoint into the Gram teacher: one of our training checkpoints (its
    EMA teacher's backbone), an export, or released weights (strictly, any DINOv3 layout)."""
    if is_training_checkpoint(source):
        state = encoder_state_from_training_checkpoint(read_training_checkpoint(source))
        load_encoder_weights(gram_teacher, state)
    else:
        load_encoder_weights(gram_teacher, str(source))
