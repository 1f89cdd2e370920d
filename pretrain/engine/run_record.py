"""What a stage ends with: its status, the checkpoint to go on from, and ``run.json`` saying so."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FINISHED = "finished"  # reached train.iterations
PAUSED = "paused"  # stopped early by train.max_iterations or a signal, with a checkpoint to resume from
STOPPED_NONFINITE = "stopped_nonfinite"
STOPPED_COLLAPSE = "stopped_collapse"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    run_dir: Path
    status: str
    iteration: int
    checkpoint: Path | None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (FINISHED, PAUSED)


def read_run_status(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
