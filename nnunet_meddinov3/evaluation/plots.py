"""A comparison as box plots of the per-case values (PNG)."""
from __future__ import annotations

from nnunet_meddinov3.evaluation.statistics import Comparison


def plot_boxplots(comparison: Comparison, path: str) -> None:
    """Per-class box plots of the per-case values (the paired cases of each class), one colour per trainer;
    one panel per metric (Dice, and NSD when computed)."""
    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    trainers = comparison.trainer_names
    colours = [f"C{i % 10}" for i in range(len(trainers))]
    n_classes = len(next(iter(comparison.tables.values())))
    fig = Figure(figsize=(max(6.0, 1.2 * n_classes * len(trainers) ** 0.5 + 2), 4.0 * len(comparison.tables)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(comparison.tables), 1, squeeze=False)[:, 0]
    width = 0.8 / len(trainers)
    for ax, (metric, rows) in zip(axes, comparison.tables.items()):
        for j, (trainer, colour) in enumerate(zip(trainers, colours)):
            positions = [i + (j - (len(trainers) - 1) / 2) * width for i in range(len(rows))]
            # matplotlib cannot draw an empty box; a class no case is defined for gets a NaN placeholder.
            data = [row.values[trainer] or [float("nan")] for row in rows]
            ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True, manage_ticks=False,
                       boxprops={"facecolor": colour, "alpha": 0.6}, medianprops={"color": "black"},
                       flierprops={"markersize": 3})
        ax.set_xticks(range(len(rows)), [row.class_name for row in rows], rotation=30 if len(rows) > 6 else 0)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(comparison.metric_title(metric))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"{comparison.dataset_name} {comparison.configuration}: per-case values over "
                      f"{len(comparison.case_ids)} cases")
    axes[0].legend(handles=[Patch(facecolor=c, alpha=0.6, label=t) for t, c in zip(trainers, colours)],
                   loc="lower left", fontsize="small")
    fig.savefig(path, dpi=120)
