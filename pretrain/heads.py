"""Projection heads of DINO (CLS token) and iBOT (patch tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> prototype scores.

    ``mlp``: Linear(in, hidden) GELU [Linear(hidden, hidden) GELU] * (nlayers - 2) Linear(hidden, bottleneck)
    (a single Linear(in, bottleneck) when nlayers == 1); ``last_layer``: Linear(bottleneck, out_dim)
    without bias. The state-dict keys (``mlp.0.*``, ``mlp.2.*``, ``mlp.4.*``, ``last_layer.weight``)
    and shapes are those of the reference DINOv3 head, so MedDINOv3's ``dino_head.*`` /
    ``ibot_head.*`` teacher weights load strictly.

    DINOv3 dropped DINO/DINOv2's weight normalisation of the prototypes (its released heads,
    MedDINOv3's included, were trained without it), so it is off by default.
    ``normalize_prototypes=True`` gives the DINOv2 ``norm_last_layer`` behaviour: weight norm
    with the gain fixed at 1, i.e. every prototype row is used L2-normalised; the parameter stays
    ``last_layer.weight`` so checkpoints keep the same keys either way.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        normalize_prototypes: bool = False,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.normalize_prototypes = normalize_prototypes
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) weights and zero biases, as the reference initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim); ``no_last_layer`` stops at the normalised bottleneck,
        ``only_last_layer`` takes the bottleneck as input."""
        if not only_last_layer:
            x = self.mlp(x)
            # eps 1e-12 underflows in fp16
            x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        if no_last_layer:
            return x
        weight = self.last_layer.weight
        if self.normalize_prototypes:
            weight = F.normalize(weight, dim=-1)
        return F.linear(x, weight)
