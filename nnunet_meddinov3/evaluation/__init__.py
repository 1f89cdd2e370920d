"""Evaluation on nnU-Net's own output folders: compare trainers' cross-validation results (Dice, NSD, Wilcoxon)."""
from nnunet_meddinov3.evaluation.compare import (
    ClassRow,
    Comparison,
    CompareError,
    compare_metric,
    compare_trainers,
    format_report,
    load_trainer_results,
    normalized_surface_distance,
    paired_wilcoxon_p,
    write_outputs,
)

__all__ = [
    "ClassRow",
    "Comparison",
    "CompareError",
    "compare_metric",
    "compare_trainers",
    "format_report",
    "load_trainer_results",
    "normalized_surface_distance",
    "paired_wilcoxon_p",
    "write_outputs",
]
