"""Evaluation: compare trainers' cross-validation results (Dice, NSD, Wilcoxon) on nnU-Net's output folders;
the frozen-encoder linear probe (:mod:`nnunet_meddinov3.evaluation.probe`) ranks encoder checkpoints."""
from nnunet_meddinov3.evaluation.compare import compare_trainers, write_outputs
from nnunet_meddinov3.evaluation.folders import CompareError, load_trainer_results
from nnunet_meddinov3.evaluation.report import format_report
from nnunet_meddinov3.evaluation.statistics import ClassRow, Comparison, compare_metric, paired_wilcoxon_p
from nnunet_meddinov3.evaluation.surface_distance import normalized_surface_distance

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
