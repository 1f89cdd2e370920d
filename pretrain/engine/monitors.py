"""Collapse monitors: statistics of the teacher's outputs, and a guard that stops a collapsing run.

DINO-style training collapses in two ways: every image gets the same features (the spread of
the CLS features across the batch goes to zero), or the teacher puts the whole batch on a few
prototypes (the entropy of its batch-mean distribution drops). KoLeo rises when features bunch
up. Each has an optional threshold; a run stops after ``patience`` consecutive violating
iterations, keeping the last periodic checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..configs.schema import MonitorConfig


@torch.no_grad()
def collapse_statistics(teacher_cls: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float) -> dict:
    """teacher_cls (N, D) backbone CLS features, teacher_logits (N, K) DINO-head logits ->

    ``teacher_entropy``: entropy of the batch-mean softmax(logits / temp), divided by log K (1 =
    all prototypes used evenly, 0 = one prototype);
    ``teacher_sample_entropy``: mean per-image entropy / log K (low = confident teacher);
    ``feature_std``: std across the batch of the L2-normalised features, averaged over dimensions,
    x sqrt(D) (about 1 for features spread over the sphere, 0 when all images look the same).
    """
    probs = F.softmax(teacher_logits.float() / teacher_temp, dim=-1)
    log_k = math.log(probs.shape[-1])
    mean = probs.mean(dim=0)
    marginal = -(mean * mean.clamp_min(1e-12).log()).sum() / log_k
    per_sample = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean() / log_k
    features = F.normalize(teacher_cls.float(), dim=-1)
    if features.shape[0] > 1:
        spread = features.std(dim=0).mean() * math.sqrt(features.shape[-1])
    else:
        spread = features.new_zeros(())
    return {"teacher_entropy": marginal, "teacher_sample_entropy": per_sample, "feature_std": spread}


class CollapseMonitor:
    """Counts consecutive iterations that break a threshold; ``update`` returns a stop message."""

    def __init__(self, config: MonitorConfig):
        self.config = config
        self.streak = 0

    def violations(self, metrics: dict) -> list[str]:
        c, found = self.config, []
        if c.min_feature_std is not None and metrics.get("feature_std", math.inf) < c.min_feature_std:
            found.append(f"feature_std {metrics['feature_std']:.4g} < {c.min_feature_std}")
        if c.min_teacher_entropy is not None and metrics.get("teacher_entropy", math.inf) < c.min_teacher_entropy:
            found.append(f"teacher_entropy {metrics['teacher_entropy']:.4g} < {c.min_teacher_entropy}")
        if c.max_koleo is not None and metrics.get("koleo_loss", -math.inf) > c.max_koleo:
            found.append(f"koleo_loss {metrics['koleo_loss']:.4g} > {c.max_koleo}")
        return found

    def update(self, iteration: int, metrics: dict) -> str | None:
        if iteration < self.config.start_iteration:
            return None
        found = self.violations(metrics)
        self.streak = self.streak + 1 if found else 0
        if found and self.streak >= self.config.patience:
            return (f"representation collapse suspected at iteration {iteration + 1}: {'; '.join(found)} "
                    f"for {self.streak} consecutive iterations (thresholds in the config's monitor section)")
        return None

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))
