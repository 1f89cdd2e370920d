"""Evaluation: compare trainers' cross-validation results (Dice, NSD, Wilcoxon) on nnU-Net's output folders;
the frozen-encoder linear probe (:mod:`nnunet_meddinov3.evaluation.probe`) ranks encoder checkpoints."""
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
