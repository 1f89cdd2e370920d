"""Collapse monitors: statistics of the teacher's outputs, and a guard that stops a collapsing run.

Self-distillation fails in ways the monitors look for, each head on its own:

- **uniform collapse** of a head: the teacher's targets are (almost) uniform over the prototypes and
  the student matches them, so the head's loss sits at its uniform value and nothing is learned. The
  DINO head reads ln K_dino (``dino_loss``), the iBOT head ln K_ibot x the fraction of global crops
  that carry a mask (``ibot_loss``: :class:`~pretrain.losses.ibot.IBOTPatchLoss` divides by every image
  of the batch, masked or not, so at masking.probability 0.5 it reads ln K_ibot / 2). A head gets
  there by flattening its own logits (``teacher_logit_std`` / ``teacher_ibot_logit_std`` fall far
  below the ~0.02 of the initialisation); once the EMA teacher has copied that head, sharpening has
  nothing left to amplify. One head can collapse while the other learns (issue 21: DINO at
  ln 256 = 5.5452 for thousands of iterations while iBOT fell from 2.78 to 1.76), so each is checked
  on its own;
- **constant features**: every image gets the same CLS feature (``feature_std`` near 0);
- **prototype concentration** of a head: the teacher puts the whole batch (DINO: its images; iBOT:
  its masked patches) on a few prototypes (the entropy of its batch-mean distribution,
  ``teacher_entropy`` / ``teacher_ibot_entropy``, drops).

KoLeo rising is an optional check. Each check keeps its own count of consecutive violating
iterations; the run stops when one reaches ``patience``, and the message names the check, the head,
the figures and what to try. A statistic that is not available (NaN: no masked patch in the batch)
neither counts nor breaks a streak.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..configs.schema import MonitorConfig
from ..losses.dino import dino_term_weights

# What moves a head off uniform targets, from the comparison with Meta's step (issue 21): the collapse
# is the recipe at the scale of the run, not a bug, and the row count of each Sinkhorn-Knopp centring
# is what it is most sensitive to.
UNIFORM_LEVERS = (
    "more teacher rows per Sinkhorn-Knopp centring (data.batch_size; optim.global_batch_size with gradient "
    "accumulation: centring runs over the whole global batch, every rank's rows); prototypes scaled to the "
    "pool (model.dino_head.prototypes / model.ibot_head.prototypes: fewer for a small data set); a sharper "
    "teacher (loss.teacher_temp_start/end, kept sharp for longer with loss.teacher_temp_warmup_iterations); "
    "the teacher momentum (optim.momentum_start/end: how fast the teacher copies the student's head, a flattening "
    "one included); "
    "a longer optim.warmup_iterations and optim.freeze_last_layer_iterations. Check that the images differ "
    "more between slices than between two crops of one slice, or start from released weights (init.weights=...)"
)

HINTS = {
    "uniform": "the teacher's targets are uniform and the student only matches them, so this head teaches "
               "nothing more from here (the features may still be of use: meddinov3 probe on the saved checkpoint "
               "tells). Try " + UNIFORM_LEVERS,
    "constant": "every image gets almost the same CLS feature. Check that the slices are not all alike (data.roots, "
                "the intensity preset), or raise model.layer_scale_init",
    "concentration": "the teacher puts the batch on a few prototypes. Keep Sinkhorn-Knopp centring on "
                     "(loss.sinkhorn_iterations >= 3), give it more rows (data.batch_size, optim.global_batch_size), "
                     "soften the teacher (loss.teacher_temp_start/end: a very sharp teacher piles the batch onto "
                     "its few most active prototypes) or slow it (optim.momentum_start/end), and scale "
                     "model.dino_head.prototypes / model.ibot_head.prototypes to the pool",
    "koleo": "the CLS features bunch up. Lower optim.lr or raise loss.koleo_weight",
}


def _entropies(logits: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(marginal, mean per-row) entropy of softmax(logits / temp), each divided by ln K."""
    probs = F.softmax(logits / temp, dim=-1)
    log_k = math.log(probs.shape[-1])
    mean = probs.mean(dim=0)
    marginal = -(mean * mean.clamp_min(1e-12).log()).sum() / log_k
    per_row = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean() / log_k
    return marginal, per_row


@torch.no_grad()
def collapse_statistics(teacher_cls: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float,
                        teacher_patch_logits: torch.Tensor | None = None) -> dict:
    """teacher_cls (N, D) backbone CLS features, teacher_logits (N, K) DINO-head logits ->

    ``teacher_entropy``: entropy of the batch-mean softmax(logits / temp), divided by log K (1 =
    all prototypes used evenly, 0 = one prototype; N rows that each pick a distinct prototype read
    ln N / ln K, so a floor must sit well below that);
    ``teacher_sample_entropy``: mean per-image entropy / log K (1 = uniform targets, low = confident);
    ``teacher_logit_std``: std of each image's logits over the prototypes, averaged (a flattened head
    has ~0; the reference initialisation gives ~0.02);
    the same three for the iBOT head on the masked patches ``teacher_patch_logits`` (M, K):
    ``teacher_ibot_entropy``, ``teacher_ibot_sample_entropy`` (per patch), ``teacher_ibot_logit_std``
    (NaN when no patch is masked);
    ``feature_std``: std across the batch of the L2-normalised features, averaged over dimensions,
    x sqrt(D) (about 1 for features spread over the sphere, 0 when all images look the same).
    """
    logits = teacher_logits.float()
    marginal, per_sample = _entropies(logits, teacher_temp)
    features = F.normalize(teacher_cls.float(), dim=-1)
    if features.shape[0] > 1:
        spread = features.std(dim=0).mean() * math.sqrt(features.shape[-1])
    else:
        spread = features.new_zeros(())
    stats = {"teacher_entropy": marginal, "teacher_sample_entropy": per_sample,
             "teacher_logit_std": logits.std(dim=-1).mean(), "feature_std": spread}
    if teacher_patch_logits is not None:
        patch = teacher_patch_logits.float()
        if patch.shape[0]:
            patch_marginal, patch_per_row = _entropies(patch, teacher_temp)
            patch_std = patch.std(dim=-1).mean()
        else:
            patch_marginal = patch_per_row = patch_std = patch.new_tensor(math.nan)
        stats.update(teacher_ibot_entropy=patch_marginal, teacher_ibot_sample_entropy=patch_per_row,
                     teacher_ibot_logit_std=patch_std)
    return stats


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class CollapseMonitor:
    """Counts, per check, consecutive iterations that break a threshold; ``update`` returns a stop message.

    ``n_prototypes`` (the DINO head's K) sets the ln K the DINO uniform check compares ``dino_loss``
    with; ``ibot_prototypes`` (the iBOT head's K) and ``ibot_masked_fraction`` (the share of global
    crops with a mask) set the iBOT head's uniform value ln K_ibot x fraction; a head left at None is not
    checked for uniform collapse. ``dino_local_share``: the share of the DINO loss that is the local-crop
    term, whose weight ``local_dino_weight`` (a logged schedule) scales it. ``default_start`` is the
    first checked iteration when ``start_iteration`` is null (the trainer passes the end of the LR
    warm-up: before it the loss sits at ln K in every healthy run too). :meth:`for_config` reads all of
    these from a run's config.
    """

    CHECKS = ("uniform_dino", "uniform_ibot", "constant", "concentration_dino", "concentration_ibot", "koleo")

    def __init__(self, config: MonitorConfig, n_prototypes: int | None = None, default_start: int = 0,
                 ibot_prototypes: int | None = None, ibot_masked_fraction: float = 0.5,
                 dino_local_share: float = 0.0):
        self.config = config
        self.log_k = math.log(n_prototypes) if n_prototypes else None
        self.ibot_log_k = math.log(ibot_prototypes) if ibot_prototypes else None
        self.ibot_masked_fraction = ibot_masked_fraction
        self.dino_local_share = dino_local_share
        self.start = config.start_iteration if config.start_iteration is not None else default_start
        self.streaks: dict[str, int] = {}

    @classmethod
    def for_config(cls, cfg) -> "CollapseMonitor":
        """The monitor of a run: its heads' prototype counts, the mask share its collate draws
        (``int(probability x images)`` of each micro-batch's global crops) and its LR warm-up. A head whose
        loss weight is 0 does not learn, so it is not checked for uniform collapse."""
        n_images = 2 * cfg.data.batch_size  # two global crops per sample
        fraction = int(cfg.masking.probability * n_images) / n_images
        return cls(cfg.monitor, cfg.model.dino_head.prototypes if cfg.loss.dino_weight > 0 else None,
                   cfg.optim.warmup_iterations,
                   ibot_prototypes=cfg.model.ibot_head.prototypes if cfg.loss.ibot_weight > 0 and fraction else None,
                   ibot_masked_fraction=fraction, dino_local_share=dino_term_weights(2, cfg.crops.n_local)[1])

    @property
    def streak(self) -> int:
        """The longest current streak of any check."""
        return max(self.streaks.values(), default=0)

    def uniform_values(self, metrics: dict) -> dict[str, float]:
        """What each checked head's loss reads when the student matches uniform targets."""
        values = {}
        if self.log_k:
            local = self.dino_local_share
            values["dino"] = self.log_k * (1 - local + local * metrics.get("local_dino_weight", 1.0))
        if self.ibot_log_k and self.ibot_masked_fraction > 0:
            values["ibot"] = self.ibot_log_k * self.ibot_masked_fraction
        return values

    def _uniform(self, head: str, uniform: float, metrics: dict) -> tuple[bool | None, str]:
        """(violated, what it saw) for one head; violated None when its statistics are not available."""
        c = self.config
        prefix = "teacher_" if head == "dino" else "teacher_ibot_"
        loss = metrics.get(f"{head}_loss")
        entropy = metrics.get(f"{prefix}sample_entropy")
        spread = metrics.get(f"{prefix}logit_std")
        limit = c.max_teacher_logit_std
        if not (_known(loss) and _known(entropy) and (limit is None or _known(spread))):
            return None, ""
        log_k = self.log_k if head == "dino" else self.ibot_log_k
        flat = limit is None or spread <= limit
        violated = (entropy >= c.max_teacher_sample_entropy and abs(loss - uniform) <= c.uniform_loss_margin * uniform
                    and flat)
        name, k = ("DINO" if head == "dino" else "iBOT"), round(math.exp(log_k))
        if head == "ibot":
            reads = f"ln K x {self.ibot_masked_fraction:g} (the share of global crops with a mask)"
        else:
            reads = "ln K" if abs(uniform - log_k) < 1e-9 else "ln K with the local term's weight"
        values = f"(K = {k})" if reads == "ln K" else f"(K = {k}, ln K = {log_k:.4f})"
        text = (f"uniform collapse of the {name} head: {head}_loss {loss:.4f} within {c.uniform_loss_margin:.0%} of "
                f"its uniform value {reads} = {uniform:.4f} {values}, "
                f"{prefix}sample_entropy {entropy:.4f} >= {c.max_teacher_sample_entropy}")
        if limit is not None:
            text += f", {prefix}logit_std {spread:.2g} <= {limit} (the head has flattened)"
        return violated, text

    def _concentration(self, head: str, metrics: dict) -> tuple[bool | None, str]:
        floor = self.config.min_teacher_entropy if head == "dino" else self.config.min_teacher_ibot_entropy
        key = "teacher_entropy" if head == "dino" else "teacher_ibot_entropy"
        value = metrics.get(key)
        if not _known(value):
            return None, ""
        log_k = (self.log_k if head == "dino" else self.ibot_log_k)
        rows = "images" if head == "dino" else "masked patches"
        text = f"prototype concentration of the {'DINO' if head == 'dino' else 'iBOT'} head: {key} {value:.4g} < {floor}"
        if log_k:
            text += (f" (the batch's {rows} use about {math.exp(value * log_k):.1f} of {round(math.exp(log_k))} "
                     "prototypes")
            spread = metrics.get("teacher_sample_entropy" if head == "dino" else "teacher_ibot_sample_entropy")
            text += f"; per-row entropy {spread:.4g})" if _known(spread) else ")"
        return value < floor, text

    def check(self, metrics: dict) -> dict[str, tuple[bool | None, str]]:
        """check -> (violated, what it saw); violated None when ``metrics`` lack what the check needs."""
        c, found = self.config, {}
        if c.max_teacher_sample_entropy is not None and c.uniform_loss_margin is not None:
            for head, uniform in self.uniform_values(metrics).items():
                found[f"uniform_{head}"] = self._uniform(head, uniform, metrics)
        if c.min_feature_std is not None and _known(metrics.get("feature_std")):
            found["constant"] = (metrics["feature_std"] < c.min_feature_std,
                                 f"constant features: feature_std {metrics['feature_std']:.4g} < {c.min_feature_std}")
        for head, floor in (("dino", c.min_teacher_entropy), ("ibot", c.min_teacher_ibot_entropy)):
            if floor is not None:
                found[f"concentration_{head}"] = self._concentration(head, metrics)
        if c.max_koleo is not None and _known(metrics.get("koleo_loss")):
            found["koleo"] = (metrics["koleo_loss"] > c.max_koleo, f"koleo_loss {metrics['koleo_loss']:.4g} > {c.max_koleo}")
        return found

    def violations(self, metrics: dict) -> list[tuple[str, str]]:
        """(check, what it saw) for every threshold ``metrics`` break."""
        return [(name, text) for name, (violated, text) in self.check(metrics).items() if violated]

    def update(self, iteration: int, metrics: dict) -> str | None:
        if iteration < self.start:
            return None
        found = []
        for name, (violated, text) in self.check(metrics).items():
            if violated is None:  # an unavailable statistic holds the streak
                continue
            self.streaks[name] = self.streaks.get(name, 0) + 1 if violated else 0
            if self.streaks[name] >= self.config.patience:
                found.append((name, text))
        if not found:
            return None
        seen = "; ".join(f"{text} for {self.streaks[name]} consecutive iterations" for name, text in found)
        hints = "; ".join(dict.fromkeys(f"[{name.split('_')[0]}] {HINTS[name.split('_')[0]]}" for name, _ in found))
        return (f"representation collapse suspected at iteration {iteration + 1}: {seen} (thresholds in the "
                f"config's monitor section; null turns one off). {hints}")

    def state_dict(self) -> dict:
        return {"streaks": dict(self.streaks), "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint from before the per-check streaks holds one shared "streak" that names no check:
        # it restarts at 0, which delays a stop by at most ``patience`` iterations
        self.streaks = {str(k): int(v) for k, v in state.get("streaks", {}).items()}
