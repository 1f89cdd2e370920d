"""DINO CLS-token self-distillation loss and its teacher temperature schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sinkhorn import sinkhorn_knopp


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher temperature as Meta's ``CosineScheduler`` with ``warmup_iters == total_iters``:
    ``np.linspace(start, end, warmup_steps)[step]``, so ``end`` from step ``warmup_steps - 1`` on."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    if warmup_steps == 1:
        return start
    return start + (end - start) * max(step, 0) / (warmup_steps - 1)


def dino_term_weights(n_global: int, n_local: int, ignore_diagonal: bool = True) -> tuple[float, float]:
    """Weights of the (global, local) DINO terms, proportional to the number of crop pairs in each.

    Global pairs: n_global * (n_global - 1) without the same-crop diagonal (n_global**2 with it);
    local pairs: n_global * n_local. With 2 global and 8 local crops: (2/18, 16/18).
    """
    global_pairs = n_global * (n_global - 1) if ignore_diagonal else n_global**2
    local_pairs = n_global * n_local
    total = global_pairs + local_pairs
    return global_pairs / total, local_pairs / total


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student CLS-token prototype distributions.

    For student logits s (S crops, B, K) and teacher probabilities t (T crops, B, K):

        loss = -1/|pairs| * sum_{(i, j) in pairs} sum_b sum_k t[j, b, k] * log_softmax(s[i, b] / student_temp)[k]

    where pairs are all (student crop i, teacher crop j) and |pairs| counts them times B. With
    ``ignore_diagonal`` (student global crops vs teacher global crops), the pairs i == j, i.e. a
    crop compared with itself, are left out, as in DINOv2/v3.

    Teacher probabilities come from :meth:`teacher_probs` (Sinkhorn-Knopp centering).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
        """Sinkhorn-Knopp centred teacher probabilities; logits (T, B, K) or (N, K), same shape out.

        All crops of the batch are centred together, as in DINOv3.
        """
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        return sinkhorn_knopp(flat, teacher_temp, n_iterations).reshape(teacher_logits.shape)

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, ignore_diagonal: bool = False
    ) -> torch.Tensor:
        """student_logits (S, B, K), teacher_probs (T, B, K) -> scalar loss."""
        n_student, batch, k = student_logits.shape
        n_teacher = teacher_probs.shape[0]
        if k != self.out_dim or teacher_probs.shape[1:] != (batch, k):
            raise ValueError(
                f"student {tuple(student_logits.shape)} / teacher {tuple(teacher_probs.shape)} do not match "
                f"out_dim {self.out_dim}"
            )
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        # cross[i, j] = -sum_b sum_k t[j, b, k] log p[i, b, k]
        cross = -torch.einsum("sbk,tbk->st", log_p, teacher_probs.float())
        if ignore_diagonal:
            cross = cross[~torch.eye(n_student, n_teacher, dtype=torch.bool, device=cross.device)]
        # A single crop compared only with itself leaves no pairs: the term is then 0.
        return cross.sum() / (max(cross.numel(), 1) * batch)

    def global_and_local(
        self,
        student_global: torch.Tensor,
        student_local: torch.Tensor | None,
        teacher_probs: torch.Tensor,
        ignore_diagonal: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two DINO terms, for the caller to weight (see :func:`dino_term_weights`).

        global term: student global crops vs teacher global crops (same-crop pairs left out);
        local term: student local crops vs teacher global crops (zero when there are no local crops).
        """
        global_term = self(student_global, teacher_probs, ignore_diagonal=ignore_diagonal)
        if student_local is None or student_local.shape[0] == 0:
            return global_term, global_term.new_zeros(())
        return global_term, self(student_local, teacher_probs)
