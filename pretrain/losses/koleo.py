"""KoLeo (Kozachenko-Leonenko) entropy regulariser on CLS features."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-sized row blocks whose backward returns each rank the summed gradient of
    its own rows (all_reduce + slice: gloo has no reduce-scatter, and KoLeo's features are small)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        blocks = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(blocks, rows.contiguous())
        ctx.n, ctx.rank = rows.shape[0], dist.get_rank()
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; never on autograd's own buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def koleo_group(group_size: int, local_batch: int, world_size: int) -> int:
    """The neighbour-set size KoLeoLoss uses: ``group_size`` capped at the global batch, which must
    either divide the per-rank batch (groups of its rows) or be whole rank batches dividing the
    global batch (ValueError otherwise)."""
    global_batch = local_batch * world_size
    group = min(group_size, global_batch)
    if group < local_batch:
        if local_batch % group == 0:
            return group
    elif group % local_batch == 0 and global_batch % group == 0:
        return group
    raise ValueError(f"KoLeo group size {group_size} must divide the per-rank batch {local_batch}, or be a multiple "
                     f"of it that divides the global batch {global_batch}")


class KoLeoLoss(nn.Module):
    """Spreads the features uniformly over the sphere (Sablayrolles et al. 2019).

    For features x_1..x_N, L2-normalised, with d_i = min_{j != i} ||x_i - x_j||:

        loss = -1/N * sum_i log(d_i + eps)

    Only the nearest-neighbour search is detached; the distances carry the gradient.

    ``group_size`` (DINOv3's distributed KoLeo, used in its high-resolution stage): under
    torch.distributed the nearest neighbours are searched among ``group_size`` samples gathered from
    adjacent ranks (rank r's rows sit at r * B in the global batch), not only in the local batch,
    and gradients reach the neighbours' ranks. The mean is over local rows, so DDP's gradient
    average equals the single-process loss on each whole group. A group larger than the global
    batch is the global batch (one GPU runs the same config); otherwise it must be a multiple of
    the local batch that divides the global one. A group smaller than the local batch splits it
    into groups of adjacent rows: one step over N x B images with groups of B is then N micro-steps
    of B, which is how a gradient-accumulation step is checked against a whole-batch one. None: the
    local batch, as in DINOv3's stage 1.
    """

    def __init__(self, eps: float = 1e-8, group_size: int | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size

    def _neighbour_set(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The candidate neighbours of the local rows and the local rows' offset among them."""
        if self.group_size is None:
            return x, 0
        distributed = dist.is_available() and dist.is_initialized()
        world, rank, local = (dist.get_world_size(), dist.get_rank(), x.shape[0]) if distributed else (1, 0, x.shape[0])
        group = koleo_group(self.group_size, local, world)  # the same rule for one process as for many
        if world == 1:
            return x, 0
        ranks_per_group = group // local
        first = rank // ranks_per_group * group
        return _GatherRows.apply(x)[first:first + group], (rank % ranks_per_group) * local

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, D), N >= 2 -> scalar."""
        x = F.normalize(features.float(), dim=-1, eps=self.eps)
        if self.group_size is not None and self.group_size < x.shape[0]:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            group = koleo_group(self.group_size, x.shape[0], world)
            if group < x.shape[0]:  # equal groups: the mean of their means is the mean over all rows
                return torch.stack([self._nearest_neighbour_loss(g, g, 0) for g in x.split(group)]).mean()
        candidates, offset = self._neighbour_set(x)
        return self._nearest_neighbour_loss(x, candidates, offset)

    def _nearest_neighbour_loss(self, x: torch.Tensor, candidates: torch.Tensor, offset: int) -> torch.Tensor:
        with torch.no_grad():
            # On the unit sphere the nearest neighbour is the largest dot product.
            dots = x @ candidates.T
            rows = torch.arange(x.shape[0], device=x.device)
            dots[rows, rows + offset] = -2.0  # not oneself
            nearest = dots.argmax(dim=1)
        squared = (x - candidates[nearest]).pow(2).sum(dim=-1)
        # clamp keeps the sqrt gradient finite for duplicated features
        distances = squared.clamp(min=1e-24).sqrt()
        return -torch.log(distances + self.eps).mean()
