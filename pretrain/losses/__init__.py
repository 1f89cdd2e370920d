"""Losses of DINOv3 pretraining: DINO (CLS), iBOT (masked patches), KoLeo and Gram anchoring."""

from .dino import DINOLoss, dino_term_weights, teacher_temperature
from .gram import GramLoss, resize_patch_features
from .ibot import IBOTPatchLoss, masks_weight
from .koleo import KoLeoLoss, koleo_group
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "GramLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "dino_term_weights",
    "koleo_group",
    "masks_weight",
    "resize_patch_features",
    "sinkhorn_knopp",
    "teacher_temperature",
]
