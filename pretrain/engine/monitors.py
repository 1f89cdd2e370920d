"""Collapse monitors: statistics of the teacher's outputs, and a guard that stops a collapsing run.

Self-distillation fails in three ways the monitors look for:

- **uniform collapse**: the teacher's per-image targets are (almost) uniform over the prototypes and
  the student matches them, so the DINO loss sits at ln K and nothing is learned. The head gets
  there by flattening its own logits (``teacher_logit_std`` falls far below its initial ~0.02);
  once the EMA teacher has copied that head, sharpening has nothing left to amplify;
- **constant features**: every image gets the same CLS feature (``feature_std`` near 0);
- **prototype concentration**: the teacher puts the whole batch on a few prototypes (the entropy of
  its batch-mean distribution, ``teacher_entropy``, drops).

KoLeo rising is a fourth, optional check. A run stops after ``patience`` consecutive iterations
with a violation, keeping the last periodic checkpoint; the message names the monitor and what to try.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..configs.schema import MonitorConfig

HINTS = {
    "uniform": "the teacher's targets are uniform and the student only matches them, so DINO and iBOT teach "
               "nothing more from here (the features may still be of use: meddinov3 probe on the saved checkpoint "
               "tells). Try a sharper teacher (loss.teacher_temp_start/end; tiny_stage1 holds 0.01) and keep it sharp for "
               "longer (loss.teacher_temp_warmup_iterations), milder views (crops.global_scale, augment.*), a longer "
               "optim.warmup_iterations and optim.freeze_last_layer_iterations; check that the images differ more "
               "between slices than between two crops of one slice, or start from released weights (init.weights=...)",
    "constant": "every image gets almost the same CLS feature. Check that the slices are not all alike (data.roots, "
                "the intensity preset), or raise model.layer_scale_init",
    "concentration": "the teacher puts the batch on a few prototypes. Check loss.sinkhorn_iterations and the "
                     "teacher temperature",
    "koleo": "the CLS features bunch up. Lower optim.lr or raise loss.koleo_weight",
}


@torch.no_grad()
def collapse_statistics(teacher_cls: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float,
                        teacher_patch_logits: torch.Tensor | None = None) -> dict:
    """teacher_cls (N, D) backbone CLS features, teacher_logits (N, K) DINO-head logits ->

    ``teacher_entropy``: entropy of the batch-mean softmax(logits / temp), divided by log K (1 =
    all prototypes used evenly, 0 = one prototype);
    ``teacher_sample_entropy``: mean per-image entropy / log K (1 = uniform targets, low = confident);
    ``teacher_logit_std``: std of each image's logits over the prototypes, averaged (a flattened head
    has ~0; the reference initialisation gives ~0.02); ``teacher_ibot_logit_std`` the same for the iBOT
    head on the masked patches ``teacher_patch_logits`` (M, K) (NaN when no patch is masked);
    ``feature_std``: std across the batch of the L2-normalised features, averaged over dimensions,
    x sqrt(D) (about 1 for features spread over the sphere, 0 when all images look the same).
    """
    logits = teacher_logits.float()
    probs = F.softmax(logits / teacher_temp, dim=-1)
    log_k = math.log(probs.shape[-1])
    mean = probs.mean(dim=0)
    marginal = -(mean * mean.clamp_min(1e-12).log()).sum() / log_k
    per_sample = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean() / log_k
    features = F.normalize(teacher_cls.float(), dim=-1)
    if features.shape[0] > 1:
        spread = features.std(dim=0).mean() * math.sqrt(features.shape[-1])
    else:
        spread = features.new_zeros(())
    stats = {"teacher_entropy": marginal, "teacher_sample_entropy": per_sample,
             "teacher_logit_std": logits.std(dim=-1).mean(), "feature_std": spread}
    if teacher_patch_logits is not None:
        patch = teacher_patch_logits.float()
        stats["teacher_ibot_logit_std"] = patch.std(dim=-1).mean() if patch.shape[0] else patch.new_tensor(math.nan)
    return stats


class CollapseMonitor:
    """Counts consecutive iterations that break a threshold; ``update`` returns a stop message.

    ``n_prototypes`` (the DINO head's K) sets the ln K the uniform check compares the DINO loss with;
    ``default_start`` is the first checked iteration when ``start_iteration`` is null (the trainer
    passes the end of the LR warm-up: before it the loss sits at ln K in every healthy run too).
    """

    def __init__(self, config: MonitorConfig, n_prototypes: int | None = None, default_start: int = 0):
        self.config = config
        self.log_k = math.log(n_prototypes) if n_prototypes else None
        self.start = config.start_iteration if config.start_iteration is not None else default_start
        self.streak = 0

    def violations(self, metrics: dict) -> list[tuple[str, str]]:
        """(monitor, what it saw) for every threshold ``metrics`` break."""
        c, found = self.config, []
        entropy, loss = metrics.get("teacher_sample_entropy"), metrics.get("dino_loss")
        spread, patch_spread = metrics.get("teacher_logit_std"), metrics.get("teacher_ibot_logit_std")
        limit = c.max_teacher_logit_std
        # both heads flattened: a run whose iBOT head still learns (patch features) is not stopped
        flat = limit is None or (spread is not None and spread <= limit
                                 and (patch_spread is None or patch_spread <= limit))
        if (c.max_teacher_sample_entropy is not None and c.uniform_loss_margin is not None and self.log_k
                and entropy is not None and loss is not None and entropy >= c.max_teacher_sample_entropy
                and abs(loss - self.log_k) <= c.uniform_loss_margin * self.log_k and flat):
            found.append(("uniform", f"uniform collapse: teacher_sample_entropy {entropy:.4f} >= "
                                     f"{c.max_teacher_sample_entropy} and dino_loss {loss:.4f} within "
                                     f"{c.uniform_loss_margin:.0%} of ln K = {self.log_k:.4f}"
                                     + ("" if limit is None else
                                        f", teacher_logit_std {spread:.2g} and teacher_ibot_logit_std "
                                        f"{patch_spread if patch_spread is not None else float('nan'):.2g} <= {limit} "
                                        "(both heads flattened)")))
        if c.min_feature_std is not None and metrics.get("feature_std", math.inf) < c.min_feature_std:
            found.append(("constant", f"constant features: feature_std {metrics['feature_std']:.4g} < "
                                      f"{c.min_feature_std}"))
        if c.min_teacher_entropy is not None and metrics.get("teacher_entropy", math.inf) < c.min_teacher_entropy:
            found.append(("concentration", f"prototype concentration: teacher_entropy "
                                           f"{metrics['teacher_entropy']:.4g} < {c.min_teacher_entropy}"))
        if c.max_koleo is not None and metrics.get("koleo_loss", -math.inf) > c.max_koleo:
            found.append(("koleo", f"koleo_loss {metrics['koleo_loss']:.4g} > {c.max_koleo}"))
        return found

    def update(self, iteration: int, metrics: dict) -> str | None:
        if iteration < self.start:
            return None
        found = self.violations(metrics)
        self.streak = self.streak + 1 if found else 0
        if found and self.streak >= self.config.patience:
            seen = "; ".join(text for _, text in found)
            hints = "; ".join(f"[{name}] {HINTS[name]}" for name, _ in found)
            return (f"representation collapse suspected at iteration {iteration + 1}: {seen} for {self.streak} "
                    f"consecutive iterations (thresholds in the config's monitor section; null turns one off). {hints}")
        return None

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))
