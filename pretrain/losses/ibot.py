"""iBOT masked-patch self-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sinkhorn import sinkhorn_knopp


def masks_weight(masks: torch.Tensor) -> torch.Tensor:
    """Per masked patch weight 1 / (number of masked patches of its image), in ``masks.nonzero()`` order.

    masks: (n_images, P) bool -> (n_masked,) float32.
    """
    per_image = 1.0 / masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    return per_image.expand(masks.shape)[masks]


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student prototype distributions of the masked patches.

    Over the M masked patches m of all images (student saw a mask token, teacher the patch):

        loss = -1/n_images * sum_m w_m * sum_k t[m, k] * log_softmax(s[m] / student_temp)[k]

    with w_m = 1 / (number of masked patches in the image of m), so that every masked image has
    the same total weight whatever its mask ratio, and n_images counting all images of the batch
    (unmasked images add nothing), as in DINOv2/v3. The teacher probabilities come from
    :meth:`teacher_probs`: Sinkhorn-Knopp over all masked patches of the batch together.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1):
        super().__init__()
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
        """(M, K) teacher logits of the masked patches -> (M, K) centred probabilities."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        masks: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """student_logits, teacher_probs: (M, K) for the masked patches in ``masks.nonzero()`` order;
        masks: (n_images, P) bool; weights: (M,) from :func:`masks_weight` (computed when omitted).
        """
        if student_logits.shape != teacher_probs.shape or student_logits.shape[-1] != self.patch_out_dim:
            raise ValueError(
                f"student {tuple(student_logits.shape)} / teacher {tuple(teacher_probs.shape)} do not match "
                f"patch_out_dim {self.patch_out_dim}"
            )
        if weights is None:
            weights = masks_weight(masks)
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        per_patch = -(teacher_probs.float() * log_p).sum(dim=-1)
        return (per_patch * weights.to(per_patch)).sum() / masks.shape[0]
