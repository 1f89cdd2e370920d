"""The pretraining engine: training loop, distributed setup, checkpoints, progress and guards."""

from .loop import Trainer, train
from .run_record import FINISHED, PAUSED, STOPPED_COLLAPSE, STOPPED_NONFINITE, RunResult, read_run_status

__all__ = ["FINISHED", "PAUSED", "STOPPED_COLLAPSE", "STOPPED_NONFINITE", "RunResult", "Trainer", "read_run_status",
           "train"]
