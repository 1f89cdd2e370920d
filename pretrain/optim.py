"""Optimiser, parameter groups and schedules of DINOv3 pretraining.

Every schedule is a pure function of the iteration, so a resumed run sets exactly the values
the uninterrupted run would have had: nothing here carries state between iterations.

The shapes are those of Meta's ``dinov3/train``, value for value (tests/pretrain/test_meta_step.py
holds them to its arrays): stage 1 is the ``CosineScheduler`` of ``build_schedulers`` (the recipe
MedDINOv3 started from has no ``schedules`` block), whose warm-up is ``np.linspace(start, peak, W)``:
it reaches the peak at step W - 1. The Gram and high-resolution stages follow Meta's later recipes,
built by ``linear_warmup_cosine_decay`` (``schedules`` v2), whose warm-up leaves the endpoint out
(peak * step / W) and whose cosines (LR rise, Gram weight, local DINO weight) reach their end value
on their last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_meddinov3.training.optim import encoder_layer_id

from .configs.schema import OptimConfig, PretrainConfig
from .losses import teacher_temperature

# --- schedule shapes ---------------------------------------------------------------------------


def cosine(step: int, start: float, end: float, length: int) -> float:
    """Half cosine from ``start`` at step 0 towards ``end``, reached at ``length``, then ``end``: the
    cosine part of Meta's ``CosineScheduler`` (``cos(pi * i / length)``, i < length)."""
    if length <= 0 or step >= length:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * max(step, 0) / length))


def linear_warmup(step: int, start: float, peak: float, warmup: int) -> float:
    """``np.linspace(start, peak, warmup)[step]`` (Meta's ``CosineScheduler`` warm-up): ``peak`` at
    step ``warmup - 1``; a warm-up of one step is ``[start]``."""
    if warmup <= 1:
        return start
    return start + (peak - start) * max(step, 0) / (warmup - 1)


def warmup_cosine(step: int, peak: float, end: float, warmup: int, total: int) -> float:
    """Meta's ``CosineScheduler(peak, end, total, warmup_iters=warmup)``: linear from 0, reaching
    ``peak`` at step ``warmup - 1``, then cosine from ``peak`` at ``warmup`` towards ``end`` at ``total``."""
    if step < warmup:
        return linear_warmup(step, 0.0, peak, warmup)
    return cosine(step - warmup, peak, end, total - warmup)


def warmup_constant(step: int, peak: float, warmup: int) -> float:
    """Meta's ``linear_warmup_cosine_decay(0, peak, peak, warmup, ...)`` (its later stages' schedules):
    ``np.linspace(0, peak, warmup, endpoint=False)``, i.e. peak * step / warmup, then constant."""
    return peak * max(step, 0) / warmup if step < warmup else peak


def cosine_inclusive(step: int, start: float, end: float, length: int) -> float:
    """The cosine of Meta's ``linear_warmup_cosine_decay`` (its later stages' schedules):
    ``(start - end) * (1 + cos(linspace(0, pi, length))) / 2 + end``, so ``end`` on step ``length - 1``;
    a cosine of one step is ``[start]``."""
    if length <= 0 or step >= length:
        return end
    if length == 1:
        return start
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * max(step, 0) / (length - 1)))


def cosine_rise_constant(step: int, peak: float, rise: int) -> float:
    """Meta's high-resolution stage, ``linear_warmup_cosine_decay(0, 0, peak, 0, total, cosine_iterations=rise)``:
    cosine from 0 to ``peak``, reached on step ``rise - 1``, then constant."""
    return cosine_inclusive(step, 0.0, peak, rise)


def scaled_lr(config: OptimConfig, global_batch_size: int) -> float:
    """The peak LR after the scaling rule; DINOv3's ``sqrt_wrt_1024`` is lr * 4 * sqrt(batch / 1024)."""
    if config.scaling_rule == "sqrt_wrt_1024":
        return config.lr * 4 * math.sqrt(global_batch_size / 1024)
    return config.lr


@dataclass(frozen=True)
class Schedules:
    """All per-iteration values of a stage, from its config and the effective global batch."""

    config: PretrainConfig
    global_batch_size: int

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.config.optim, self.global_batch_size)

    def lr(self, step: int) -> float:
        o, total = self.config.optim, self.config.train.iterations
        if o.lr_schedule == "warmup_cosine":
            return warmup_cosine(step, self.peak_lr, o.min_lr, o.warmup_iterations, total)
        if o.lr_schedule == "cosine_rise_constant":
            return cosine_rise_constant(step, self.peak_lr, o.warmup_iterations)
        return warmup_constant(step, self.peak_lr, o.warmup_iterations)

    def weight_decay(self, step: int) -> float:
        o = self.config.optim
        return cosine(step, o.weight_decay, o.weight_decay_end, self.config.train.iterations)

    def momentum(self, step: int) -> float:
        o = self.config.optim
        return cosine(step, o.momentum_start, o.momentum_end, self.config.train.iterations)

    def teacher_temp(self, step: int) -> float:
        loss = self.config.loss
        return teacher_temperature(step, loss.teacher_temp_warmup_iterations, loss.teacher_temp_start,
                                   loss.teacher_temp_end)

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.config.optim.freeze_last_layer_iterations

    def local_dino_weight(self, step: int) -> float:
        loss = self.config.loss
        return cosine_inclusive(step, loss.local_dino_weight_start, loss.local_dino_weight_end,
                                loss.local_dino_weight_ramp_iterations)

    def gram_weight(self, step: int) -> float:
        gram = self.config.gram
        if not gram.enabled:
            return 0.0
        return cosine_inclusive(step, 0.0, gram.weight, gram.weight_ramp_iterations)

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr(step),
            "weight_decay": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
            "last_layer_frozen": float(self.last_layer_frozen(step)),
            "local_dino_weight": self.local_dino_weight(step),
            "gram_weight": self.gram_weight(step),
        }


# --- parameter groups ------------------------------------------------------------------------------

def layer_id(name: str, depth: int) -> int:
    """0 for the patch embedding and learned tokens, i + 1 for block i, depth + 1 for the final
    norm and the heads (the reference's layer-wise LR decay numbering; the encoder's numbering
    is fine-tuning's :func:`~nnunet_meddinov3.training.optim.encoder_layer_id`)."""
    if not name.startswith("backbone."):
        return depth + 1
    if name.endswith("mask_token"):  # the iBOT token of MaskableBackbone, beside the encoder
        return 0
    return encoder_layer_id(name, depth)


def parameter_groups(network: nn.Module, config: OptimConfig, depth: int) -> list[dict]:
    """AdamW groups with ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``, ``is_backbone``.

    Layer-wise decay: lr x decay ** (depth + 1 - layer_id); the patch embedding additionally
    x ``patch_embed_lr_mult``. No weight decay on biases, norms and layer scales: Meta's rule
    (``get_params_groups_with_decay_fsdp``), which decays the learned tokens (CLS, storage, iBOT
    mask) although its comment says otherwise; ``config.weight_decay_on_tokens=False`` spares them.
    ``is_backbone`` marks what the head warm-up freezes (the mask token trains with the heads:
    released weights rarely have a trained one). Parameters with equal settings share a group.
    """
    no_decay_suffixes = ("bias",) if config.weight_decay_on_tokens else ("bias", "_token")
    groups: dict[tuple, dict] = {}
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        lr_multiplier = config.layerwise_decay ** (depth + 1 - layer_id(name, depth))
        if "patch_embed" in name:
            lr_multiplier *= config.patch_embed_lr_mult
        no_decay = name.endswith(no_decay_suffixes) or "norm" in name or "gamma" in name
        key = (
            lr_multiplier,
            0.0 if no_decay else 1.0,
            "last_layer" in name,
            name.startswith("backbone.") and not name.endswith("mask_token"),
        )
        group = groups.setdefault(key, {
            "params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
            "is_last_layer": key[2], "is_backbone": key[3],
        })
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(network: nn.Module, config: OptimConfig, depth: int) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; LR and weight decay are set every iteration by
    :func:`apply_schedules`."""
    return torch.optim.AdamW(parameter_groups(network, config, depth), lr=0.0, betas=tuple(config.betas),
                             weight_decay=0.0)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_frozen: bool,
                    backbone_factor: float = 1.0) -> None:
    """Set every group's LR and weight decay for this iteration.

    ``backbone_factor`` scales the backbone's LR (0 while the head warm-up freezes it). A frozen
    last layer gets LR 0, which with AdamW's decoupled decay also stops its weight decay.
    """
    for group in optimizer.param_groups:
        factor = group["lr_multiplier"]
        if group["is_backbone"]:
            factor *= backbone_factor
        if group["is_last_layer"] and last_layer_frozen:
            factor = 0.0
        group["lr"] = lr * factor
        group["weight_decay"] = weight_decay * group["wd_multiplier"]


def clip_gradients(network: nn.Module, max_norm: float, parts=("backbone", "dino_head", "ibot_head")) -> dict:
    """Clip each sub-network's gradient norm to ``max_norm`` separately (as the reference; 0 = no
    clipping) and return the norms before clipping; non-finite norms are returned as they are."""
    norms = {}
    for part in parts:
        params = [p for p in getattr(network, part).parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        norms[part] = float(norm)
    return norms
