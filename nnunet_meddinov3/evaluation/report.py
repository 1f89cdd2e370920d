"""A comparison as text (aligned tables), CSV (long format) and JSON."""
from __future__ import annotations

import csv
import json
import math

from nnunet_meddinov3.evaluation.statistics import MEAN_ROW_KEY, ClassRow, Comparison


def format_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _align(rows: list[list[str]], left_columns: int) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < left_columns else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows)


def format_table(rows: list[ClassRow], trainers: list[str], title: str) -> str:
    baseline = trainers[0]
    header = ["class", "n"] + trainers
    for t in trainers[1:]:
        header += [f"diff {t}", f"p {t}"] if len(trainers) > 2 else ["diff", "p (Wilcoxon)"]
    lines = [header]
    for row in rows:
        # "1 liver"; just "1" when dataset.json gave no name, and the mean row has no key to show
        name = row.class_name if row.class_name == row.class_key or row.class_key == MEAN_ROW_KEY \
            else f"{row.class_key} {row.class_name}"
        cells = [name, str(row.n_cases)] + [f"{row.mean[t]:.4f} +/- {row.std[t]:.4f}" for t in trainers]
        for t in trainers[1:]:
            cells += [f"{row.diff_to_baseline[t]:+.4f}", format_p(row.p_value[t])]
        lines.append(cells)
    explanation = f"{title}: mean +/- std over cases"
    if len(trainers) > 1:
        explanation += f"; diff = mean - mean of baseline {baseline}, p = paired Wilcoxon signed-rank test"
    return explanation + "\n" + _align(lines, left_columns=1)


def format_report(comparison: Comparison) -> str:
    lines = [f"{comparison.dataset_name}, configuration {comparison.configuration}, plans {comparison.plans}"]
    for r in comparison.trainers:
        line = (f"  {r.trainer}: folds {' '.join(map(str, r.folds_used))} ({len(r.cases)} cases)"
                + (" [baseline]" if r is comparison.trainers[0] else ""))
        lines.append(line)
        folds_by_reason = {}  # one line per reason: "missing folds 2 3 4: not trained" rather than three lines
        for fold, why in r.folds_missing.items():
            folds_by_reason.setdefault(why, []).append(str(fold))
        for why, folds in folds_by_reason.items():
            lines.append(f"    missing fold{'s' if len(folds) > 1 else ''} {' '.join(folds)}: {why}")
    n_dropped = len(set().union(*map(set, comparison.dropped_cases.values())))
    line = f"Cases: {len(comparison.case_ids)} present for every trainer are compared, {n_dropped} dropped"
    if n_dropped:
        line += " (" + ", ".join(f"{t}: {len(c)}" for t, c in comparison.dropped_cases.items() if c) + \
                " not in every trainer's results)"
    lines.append(line)
    lines += [f"Note: {note}" for note in comparison.notes]
    for metric, rows in comparison.tables.items():
        lines += ["", format_table(rows, comparison.trainer_names, comparison.metric_title(metric))]
    return "\n".join(lines)


def _json_number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x  # NaN is not JSON


def write_csv(comparison: Comparison, path: str) -> None:
    """One row per metric, class and trainer (long format, easy to load into pandas or a spreadsheet)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "class_key", "class_name", "trainer", "n_cases", "mean", "std",
                         "diff_to_baseline", "p_value_wilcoxon"])
        for metric, rows in comparison.tables.items():
            for row in rows:
                for t in comparison.trainer_names:
                    diff, p = row.diff_to_baseline.get(t), row.p_value.get(t)
                    writer.writerow([comparison.metric_title(metric), row.class_key, row.class_name, t, row.n_cases,
                                     row.mean[t], row.std[t], "" if diff is None else diff, "" if p is None else p])


def comparison_to_dict(comparison: Comparison) -> dict:
    def row_dict(row: ClassRow) -> dict:
        return {"class_key": row.class_key, "class_name": row.class_name, "n_cases": row.n_cases,
                "trainers": {t: {"mean": _json_number(row.mean[t]), "std": _json_number(row.std[t])}
                             for t in comparison.trainer_names},
                "vs_baseline": {t: {"diff": _json_number(row.diff_to_baseline[t]),
                                    "p_value_wilcoxon": _json_number(row.p_value[t])} for t in row.diff_to_baseline}}

    return {
        "dataset": comparison.dataset_name, "configuration": comparison.configuration, "plans": comparison.plans,
        "baseline": comparison.trainer_names[0], "nsd_tolerance_mm": comparison.nsd_tolerance_mm,
        "trainers": {r.trainer: {"folder": r.folder, "folds_used": r.folds_used,
                                 "folds_missing": {str(f): why for f, why in r.folds_missing.items()},
                                 "n_cases": len(r.cases)} for r in comparison.trainers},
        "cases_compared": comparison.case_ids, "dropped_cases": comparison.dropped_cases,
        "notes": comparison.notes,
        "metrics": {metric: [row_dict(row) for row in rows] for metric, rows in comparison.tables.items()},
        "per_case": {metric: {t: {c: {k: _json_number(v) for k, v in classes.items()} for c, classes in cases.items()}
                              for t, cases in trainers.items()} for metric, trainers in comparison.per_case.items()},
    }


def write_json(comparison: Comparison, path: str) -> None:
    with open(path, "w") as f:
        json.dump(comparison_to_dict(comparison), f, indent=2)
