"""The weighted objective of one micro-batch: the recipe's losses on the networks' outputs."""

from __future__ import annotations

import torch

from ..configs import PretrainConfig
from ..losses import DINOLoss, GramLoss, IBOTPatchLoss, KoLeoLoss, dino_term_weights

N_GLOBAL = 2  # MultiCropAugmentation always makes two global crops


def build_losses(config: PretrainConfig) -> dict:
    return {
        "dino": DINOLoss(config.model.dino_head.prototypes, config.loss.student_temp),
        "ibot": IBOTPatchLoss(config.model.ibot_head.prototypes, config.loss.student_temp),
        "koleo": KoLeoLoss(group_size=config.loss.koleo_group_size),
        "gram": GramLoss(img_level=config.gram.img_level),
    }


def compute_losses(losses: dict, config: PretrainConfig, sched: dict, student: dict, targets: dict,
                   gram_target: torch.Tensor | None, masks: torch.Tensor,
                   masks_weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted loss of one micro-batch from the student's outputs (crop-major rows) and the
    teacher's centred ``targets`` (``{"dino": (n_global * B, K), "ibot": (M, K)}``, from
    :func:`~pretrain.engine.teacher_targets.centred_targets`, centred over the global batch).

    Runs with autocast off: under bf16 autocast the DINO loss's einsum and the KoLeo and Gram
    matmuls would otherwise be computed (and differentiated) in bf16, which quantises a loss near
    log(65536) = 11.09 to steps of 0.06. The losses cast their inputs to fp32 themselves.
    """
    device_type = student["cls"].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        b = student["cls"].shape[0] // N_GLOBAL
        n_local = student["dino_local"].shape[0] // b
        teacher_dino, teacher_ibot = targets["dino"].unflatten(0, (N_GLOBAL, b)), targets["ibot"]
        local = student["dino_local"].unflatten(0, (n_local, b)) if n_local else None
        dino_global, dino_local = losses["dino"].global_and_local(
            student["dino_global"].unflatten(0, (N_GLOBAL, b)), local, teacher_dino)
        w_global, w_local = dino_term_weights(N_GLOBAL, n_local)
        dino = w_global * dino_global + w_local * sched["local_dino_weight"] * dino_local
        ibot = losses["ibot"](student["ibot_masked"], teacher_ibot, masks, masks_weight)
        # per global crop, summed: the reference's mean x n_global
        koleo = sum(losses["koleo"](c) for c in student["cls"].unflatten(0, (N_GLOBAL, b)))
        w = config.loss
        total = w.dino_weight * dino + w.ibot_weight * ibot + w.koleo_weight * koleo
        terms = {"dino_loss": dino, "dino_global_loss": dino_global, "dino_local_loss": dino_local,
                 "ibot_loss": ibot, "koleo_loss": koleo}
        if gram_target is not None:
            gram = losses["gram"](student["patch"], gram_target)
            total = total + sched["gram_weight"] * gram
            terms["gram_loss"] = gram
    return total, terms
