"""The statistics of a comparison: per-class mean/std over the paired cases and paired Wilcoxon signed-rank tests
against the baseline trainer; :class:`Comparison` holds them with what they were computed from."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nnunet_meddinov3.evaluation.folders import TrainerResults, parse_class_key

DICE = "Dice"
NSD = "NSD"
MEAN_ROW_KEY = "mean"


def paired_wilcoxon_p(baseline: list[float], other: list[float]) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value (scipy defaults); 1.0 when all differences are zero
    (scipy cannot rank an all-zero sample and, depending on the version, warns or returns NaN), NaN without cases."""
    from scipy.stats import wilcoxon

    differences = np.asarray(other, dtype=float) - np.asarray(baseline, dtype=float)
    if differences.size == 0:
        return float("nan")
    if np.all(differences == 0):
        return 1.0
    return float(wilcoxon(other, baseline).pvalue)


@dataclass
class ClassRow:
    """One class (or the foreground mean) of one metric: per-trainer mean/std over the paired cases."""
    class_key: str  # "1", "(1, 2)" or MEAN_ROW_KEY
    class_name: str
    case_ids: list[str]  # the cases every trainer has a value for
    values: dict[str, list[float]]  # trainer -> per-case values, in case_ids order
    mean: dict[str, float]
    std: dict[str, float]  # sample std (ddof=1); NaN for a single case
    diff_to_baseline: dict[str, float]  # non-baseline trainer -> its mean - baseline mean
    p_value: dict[str, float]  # non-baseline trainer -> paired Wilcoxon p vs baseline

    @property
    def n_cases(self) -> int:
        return len(self.case_ids)


def _summarise(class_key: str, class_name: str, case_ids: list[str], values: dict[str, list[float]],
               trainers: list[str]) -> ClassRow:
    baseline = trainers[0]
    mean = {t: float(np.mean(values[t])) if case_ids else float("nan") for t in trainers}
    std = {t: float(np.std(values[t], ddof=1)) if len(case_ids) > 1 else float("nan") for t in trainers}
    diff = {t: mean[t] - mean[baseline] for t in trainers[1:]}
    p = {t: paired_wilcoxon_p(values[baseline], values[t]) for t in trainers[1:]}
    return ClassRow(class_key, class_name, case_ids, values, mean, std, diff, p)


def compare_metric(per_case: dict[str, dict[str, dict[str, float]]], trainers: list[str], case_ids: list[str],
                   class_keys: list[str], class_names: dict[str, str]) -> list[ClassRow]:
    """Rows for each class plus a foreground-mean row from ``per_case[trainer][case][class_key]``.

    A case enters a class only if every trainer has a finite value (NaN Dice = empty reference and prediction).
    The mean row averages, per case, the foreground classes that entered for that case, then summarises over cases
    like a class (so it can be tested pairwise; it can differ slightly from nnU-Net's mean of class means).
    """
    def value(trainer, case, key):
        return per_case[trainer][case].get(key, float("nan"))

    def defined_for_all(case, key):
        return all(math.isfinite(value(t, case, key)) for t in trainers)

    rows = []
    for key in class_keys:
        cases = [c for c in case_ids if defined_for_all(c, key)]
        rows.append(_summarise(key, class_names[key], cases, {t: [value(t, c, key) for c in cases] for t in trainers},
                               trainers))

    foreground = [k for k in class_keys if parse_class_key(k) != (0,)]
    mean_cases, mean_values = [], {t: [] for t in trainers}
    for case in case_ids:
        keys = [k for k in foreground if defined_for_all(case, k)]
        if not keys:
            continue
        mean_cases.append(case)
        for t in trainers:
            mean_values[t].append(float(np.mean([value(t, case, k) for k in keys])))
    rows.append(_summarise(MEAN_ROW_KEY, "mean (foreground)", mean_cases, mean_values, trainers))
    return rows


@dataclass
class Comparison:
    """One comparison: the trainers' results it read and the tables computed from them."""
    dataset_name: str
    configuration: str
    plans: str
    trainers: list[TrainerResults]  # baseline first
    case_ids: list[str]  # cases every trainer has
    dropped_cases: dict[str, list[str]]  # trainer -> its cases that not every trainer has
    class_names: dict[str, str]  # class key -> name from dataset.json
    tables: dict[str, list[ClassRow]]  # DICE / NSD -> rows
    per_case: dict[str, dict[str, dict[str, dict[str, float]]]]  # metric -> trainer -> case -> class key -> value
    nsd_tolerance_mm: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainer_names(self) -> list[str]:
        return [t.trainer for t in self.trainers]

    def metric_title(self, metric: str) -> str:
        return f"NSD at {self.nsd_tolerance_mm:g} mm" if metric == NSD else metric
