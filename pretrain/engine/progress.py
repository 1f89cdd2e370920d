"""Progress reporting on rank 0: a tqdm bar on a terminal, plain progress lines elsewhere, a JSONL metrics
log and a PNG of the loss curves."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curves.png"
LOSS_KEYS = ("total_loss", "dino_loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "gram_loss",
             "teacher_sample_entropy", "probe_dice")
# the losses a progress line shows (gram_loss only in Gram stages), then the learning rate
LINE_KEYS = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "gram_loss", "lr")
# A progress line at most this often: a few seconds is what a person watching expects, and a batch job's
# log of a fast (GPU) run stays at 360 lines an hour. Slower iterations get a line each.
LINE_INTERVAL_S = 10.0


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(name: str, done: int, total: int, metrics: dict, seconds_per_iteration: float,
                  elapsed: float) -> str:
    """``[tiny_stage1] iteration 12/60 (20%) | total_loss 9.12 dino_loss 5.55 ... lr 1.2e-05 | 3.41 s/it |
    elapsed 0:00:41 | ETA 0:02:43``; the ETA is for ``total``."""
    values = " ".join(f"{k} {metrics[k]:.4g}" for k in LINE_KEYS if isinstance(metrics.get(k), (int, float)))
    eta = _clock((total - done) * seconds_per_iteration)
    return (f"[{name}] iteration {done}/{total} ({100 * done / max(total, 1):.0f}%) | {values} | "
            f"{seconds_per_iteration:.3g} s/it | elapsed {_clock(elapsed)} | ETA {eta}")


def _json_value(value):
    # JSON has no NaN/inf; the log must still show them (the NaN guard's evidence)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class ProgressReporter:
    """Writes nothing unless ``enabled`` (rank 0). The tqdm bar (``bar``, train.progress_bar) only on a
    terminal: in a pipe or a log file its carriage-return updates are no lines a reader of the log or a
    line filter (``meddinov3 demo``) can use. Otherwise, and with the bar off, a plain :func:`progress_line` after the first
    iteration, then at most every ``line_interval_s`` seconds, and at the last iteration. On resume, log
    lines after the resumed iteration (written by the interrupted run after its last checkpoint) are
    dropped, so the log reads like one uninterrupted run."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool, bar: bool,
                 line_interval_s: float = LINE_INTERVAL_S, clock=time.monotonic):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.plot_path = Path(run_dir) / PLOT_FILE
        self.bar = None
        self.name, self.total, self.done = Path(run_dir).name, total, start
        self.line_interval_s, self.clock = line_interval_s, clock
        self.started = self.first_done_at = self.first_done = self.last_line_at = None
        if not enabled:
            return
        kept = [m for m in read_metrics(run_dir) if m.get("iteration", 0) <= start]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=self.name, dynamic_ncols=True)
        self.started = clock()

    def step(self, metrics: dict | None = None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("total_loss", "lr") if k in metrics},
                                     refresh=False)
        elif self.enabled:
            self._maybe_print_line(metrics or {})

    def _maybe_print_line(self, metrics: dict) -> None:
        now = self.clock()
        if self.first_done_at is None:
            # the first iteration also pays for start-up (loader workers, caches): later rates leave it out
            self.first_done_at, self.first_done = now, self.done
            seconds_per_iteration = now - self.started
        elif now - self.last_line_at < self.line_interval_s and self.done < self.total:
            return
        else:
            seconds_per_iteration = (now - self.first_done_at) / (self.done - self.first_done)
        self.last_line_at = now
        print(progress_line(self.name, self.done, self.total, metrics, seconds_per_iteration, now - self.started),
              flush=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: _json_value(v) for k, v in metrics.items()}) + "\n")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def plot(self) -> Path | None:
        """Loss curves, one panel per loss term, from the JSONL log."""
        if not self.enabled:
            return None
        records = read_metrics(self.path.parent)
        keys = [k for k in LOSS_KEYS if any(isinstance(r.get(k), (int, float)) for r in records)]
        if not keys:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(len(keys), 3)
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1)
            ax.set_title(key)
            ax.set_xlabel("iteration")
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=90)
        plt.close(fig)
        return self.plot_path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
