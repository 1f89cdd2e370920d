"""Gram anchoring loss (DINOv3 stage 2) and the Gram-teacher feature resize."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_patch_features(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize channels-last patch maps (B, h, w, D) to (B, H, W, D), ``size`` = (H, W).

    Brings the Gram teacher's features (it sees a crop at 2x the student's resolution) onto the
    student's patch grid; ``align_corners=False`` and no antialiasing, as DINOv3's default.
    Flatten the result with ``.flatten(1, 2)`` to get (B, H*W, D) tokens.
    """
    maps = features.permute(0, 3, 1, 2).float()
    resized = F.interpolate(maps, size=tuple(size), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(features.dtype)


class GramLoss(nn.Module):
    """MSE between the patch-similarity (Gram) matrices of student and Gram teacher.

    With X_s, X_t (B, P, D) row-wise L2-normalised, G = X X^T (B, P, P):

        loss = mean_{b, i, j} (G_s[b, i, j] - G_t[b, i, j])^2

    The normalisation makes the loss invariant to the feature scale. With ``img_level=False``
    the B*P tokens of the batch form one (B*P, B*P) Gram matrix instead (DINOv3's config default).
    """

    def __init__(self, img_level: bool = True):
        super().__init__()
        self.img_level = img_level

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """student, teacher: (B, P, D) patch features -> scalar."""
        if student.shape != teacher.shape or student.dim() != 3:
            raise ValueError(f"expected equal (B, P, D) shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.detach().float(), dim=-1)  # the Gram teacher is a fixed target
        if not self.img_level:
            s, t = s.flatten(0, 1), t.flatten(0, 1)
        return F.mse_loss(s @ s.transpose(-1, -2), t @ t.transpose(-1, -2))
