"""One pretraining stage: the loop over iterations, its guards (non-finite losses, collapse, stop
signals, ``train.max_iterations``), periodic checkpoints and how the stage ends.

The stage's state (setup, restore, checkpoint) is :mod:`.stage_state`, one optimiser step
:mod:`.step`, the record of how a stage ended :mod:`.run_record`.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from nnunet_meddinov3.durable_files import write_atomically
from nnunet_meddinov3.stop_signals import PREEMPTION_SIGNALS, StopSignals

from ..configs import PretrainConfig, config_from_dict
from .data import build_loader
from .distributed import DistributedContext, init_distributed, peak_memory_gib, shutdown_distributed
from .progress import ProgressReporter
from .run_record import FINISHED, PAUSED, RUN_FILE, STOPPED_COLLAPSE, STOPPED_NONFINITE, RunResult
from .stage_state import StageState
from .step import TrainingStep


class Trainer(StageState, TrainingStep):
    """Runs one stage in ``run_dir``; ``resume`` continues from its latest checkpoint if it has one."""

    def __init__(self, config: PretrainConfig, run_dir: str | Path, context: DistributedContext, resume: bool = False,
                 cache_dir: str | Path | None = None):
        self.config = config
        self.run_dir = Path(run_dir).resolve()
        self.context = context
        self.resume = resume
        self.cache_dir = Path(cache_dir or config.data.cache_dir or self.run_dir / "slice_cache")
        # Ctrl-C stops like SIGTERM; a second Ctrl-C interrupts at once (KeyboardInterrupt). The loop all-reduces
        # the request at the end of the iteration, so every rank stops at the same one.
        self.stop = StopSignals(PREEMPTION_SIGNALS + (signal.SIGINT,), ends_when_repeated=(signal.SIGINT,))

    def run(self) -> RunResult:
        cfg, ctx = self.config, self.context
        total = cfg.train.iterations
        stop = min(total, cfg.train.max_iterations or total)
        start = self.start_iteration
        progress = ProgressReporter(self.run_dir, total, start, ctx.is_main, cfg.train.progress_bar)
        if self.resumed_from is not None:
            progress.message(f"resuming {self.run_dir.name} from {self.resumed_from.name} (iteration {start})")
        if start >= stop:
            progress.close()
            status = FINISHED if start >= total else PAUSED
            return self._finish(status, start, self.resumed_from, "nothing to do: already at iteration "
                                f"{start}", progress)
        loader = build_loader(cfg, self.slices, ctx.rank, ctx.world_size, self.accumulation, start, stop,
                              pin_memory=ctx.device.type == "cuda", patch_size=self.student.encoder.patch_size)
        batches = iter(loader)
        last_saved = self.resumed_from
        window_time, window_iterations = 0.0, 0
        with self.stop:
            for iteration in range(start, stop):
                tick = time.perf_counter()
                metrics = self.train_iteration(iteration, batches)
                done = iteration + 1
                probed = self.probe is not None and done % cfg.eval.every == 0
                if probed:
                    metrics.update(self.probe(self.teacher.encoder))
                elapsed = time.perf_counter() - tick
                window_time += elapsed
                window_iterations += 1
                if metrics["finite"]:
                    self.nonfinite_streak = 0
                    message = self.head_warmup.observe(iteration, metrics["dino_loss"])
                    if message:
                        progress.message(message)
                else:
                    self.nonfinite_streak += 1
                    self.nonfinite_iterations.append(done)
                progress.step(metrics)
                if done % cfg.train.log_every == 0 or not metrics["finite"] or done == stop or probed:
                    progress.log({"iteration": done, **metrics,
                                  "images_per_s": self.global_batch * window_iterations / max(window_time, 1e-9),
                                  "memory_gib": peak_memory_gib(ctx.device), "seconds": elapsed})
                    window_time, window_iterations = 0.0, 0

                if self.nonfinite_streak >= cfg.monitor.nonfinite_patience:
                    bad = self.nonfinite_iterations[-self.nonfinite_streak:]
                    message = (f"stopping: the loss was not finite for {self.nonfinite_streak} consecutive iterations "
                               f"({bad[0]}-{bad[-1]}); no optimiser step was taken on them. The last good "
                               f"checkpoint is {last_saved or 'none (no checkpoint was written yet)'}. Lower optim.lr, "
                               "raise the warm-up, or check the data")
                    return self._finish(STOPPED_NONFINITE, done, last_saved, message, progress)
                collapse = self.monitor.update(iteration, metrics) if metrics["finite"] else None
                if collapse:
                    # the weights are finite and may still be of use (export, probe): keep them
                    last_saved = self.save(done)
                    message = (f"stopping: {collapse}. Saved {last_saved}: export or probe it as it is, or continue "
                               "with --resume and that monitor's threshold set to null")
                    return self._finish(STOPPED_COLLAPSE, done, last_saved, message, progress)

                periodic = cfg.train.checkpoint_every > 0 and done % cfg.train.checkpoint_every == 0
                # a checkpoint written during a non-finite streak would not be a "good" one
                if (periodic or done == stop or metrics["stop_requested"]) and self.nonfinite_streak == 0:
                    last_saved = self.save(done)
                    if done < stop and not metrics["stop_requested"]:
                        progress.plot()  # at the end of the run _finish draws it
                if metrics["stop_requested"]:
                    return self._finish(PAUSED, done, last_saved, f"stopped by {self.stop.signal_name or 'a signal'} "
                                        "after a checkpoint; resume with --resume", progress)
            status = FINISHED if stop == total else PAUSED
            message = "done" if status == FINISHED else f"paused at train.max_iterations={stop}; resume with --resume"
            return self._finish(status, stop, last_saved, message, progress)

    def _finish(self, status: str, iteration: int, checkpoint: Path | None, message: str,
                progress: ProgressReporter) -> RunResult:
        progress.plot()
        progress.message(f"[{self.config.name}] {status} at iteration {iteration}: {message}")
        progress.close()
        if self.context.is_main:
            record = {"status": status, "iteration": iteration, "message": message,
                      "checkpoint": str(checkpoint) if checkpoint else None, "config": self.config.name,
                      "stage": self.config.stage, "global_batch_size": self.global_batch,
                      "processes": self.context.world_size, "accumulation": self.accumulation}
            write_atomically(self.run_dir / RUN_FILE, lambda f: f.write(json.dumps(record, indent=1).encode()))
        self.context.barrier()
        return RunResult(self.run_dir, status, iteration, Path(checkpoint) if checkpoint else None, message)


def train(config: PretrainConfig | dict, run_dir: str | Path, resume: bool = False,
          context: DistributedContext | None = None, cache_dir: str | Path | None = None) -> RunResult:
    """Run (or resume) one stage; joins/leaves the torchrun process group unless ``context`` is given."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    own_context = context is None
    context = context or init_distributed(config.train.distributed_timeout_minutes)
    try:
        trainer = Trainer(config, run_dir, context, resume=resume, cache_dir=cache_dir)
        trainer.setup()
        return trainer.run()
    finally:
        if own_context:
            shutdown_distributed(context)


__all__ = ["Trainer", "train"]
