"""Progress reporting on rank 0: a tqdm bar, a JSONL metrics log and a PNG of the loss curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curves.png"
LOSS_KEYS = ("total_loss", "dino_loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "gram_loss",
             "teacher_sample_entropy", "probe_dice")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_value(value):
    # JSON has no NaN/inf; the log must still show them (the NaN guard's evidence)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class ProgressReporter:
    """Writes nothing unless ``enabled`` (rank 0). On resume, log lines after the resumed
    iteration (written by the interrupted run after its last checkpoint) are dropped, so the log
    reads like one uninterrupted run."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool, bar: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.plot_path = Path(run_dir) / PLOT_FILE
        self.bar = None
        if not enabled:
            return
        kept = [m for m in read_metrics(run_dir) if m.get("iteration", 0) <= start]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=Path(run_dir).name, dynamic_ncols=True)

    def step(self, metrics: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("total_loss", "lr") if k in metrics},
                                     refresh=False)

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
