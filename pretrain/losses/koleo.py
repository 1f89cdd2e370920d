"""KoLeo (Kozachenko-Leonenko) entropy regulariser on CLS features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """Spreads the features uniformly over the sphere (Sablayrolles et al. 2019).

    For features x_1..x_N, L2-normalised, with d_i = min_{j != i} ||x_i - x_j||:

        loss = -1/N * sum_i log(d_i + eps)

    Only the nearest-neighbour search is detached; the distances carry the gradient.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, D), N >= 2 -> scalar."""
        x = F.normalize(features.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            # On the unit sphere the nearest neighbour is the largest dot product.
            dots = x @ x.T
            dots.fill_diagonal_(-2.0)
            nearest = dots.argmax(dim=1)
        squared = (x - x[nearest]).pow(2).sum(dim=-1)
        # clamp keeps the sqrt gradient finite for duplicated features
        distances = squared.clamp(min=1e-24).sqrt()
        return -torch.log(distances + self.eps).mean()
