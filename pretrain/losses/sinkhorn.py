"""Sinkhorn-Knopp teacher centering (SwAV / DINOv2 / DINOv3)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   in_place: bool = False) -> torch.Tensor:
    """Balanced soft assignment of N samples to K prototypes.

    Starting from ``Q = exp(logits / teacher_temp)`` (N, K), alternately rescale the prototype
    columns to total mass 1/K and the sample rows to mass 1/N_total, ``n_iterations`` times, then
    multiply by N_total so that every row is a probability distribution over the K prototypes
    (rows sum to 1, column sums approach N_total / K).

    When ``torch.distributed`` is initialised, the global maximum, the total mass, the column
    sums and the sample count are all-reduced, so every rank returns its rows of the result the
    single-process call would give on the concatenated batch. Ranks may hold different N (iBOT
    masked patches), including none.

    Returns float32 probabilities of shape (N, K). ``in_place``: a float32 ``teacher_logits`` is
    overwritten with the result instead of copied (over a global batch of 65,536 prototypes that
    buffer is the whole cost of the call).
    """
    if in_place and teacher_logits.dtype == torch.float32:
        logits = teacher_logits.div_(teacher_temp)
    else:  # one new float32 buffer, which the steps below may then work in
        logits = teacher_logits.to(torch.float32, copy=True).div_(teacher_temp)
    n_samples = _all_reduce(torch.tensor(float(logits.shape[0]), device=logits.device))
    if n_samples.item() == 0:
        return logits.new_zeros(logits.shape)
    n_prototypes = logits.shape[1]

    # Subtracting the global max keeps exp() finite at temperature 0.04; the first normalisation
    # divides the constant factor out again, so the result is unchanged.
    local_max = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    global_max = _all_reduce(local_max.clone(), op=dist.ReduceOp.MAX)
    q = logits.sub_(global_max).exp_()  # in place: a second (N, K) buffer would double the cost
    q /= _all_reduce(q.sum())

    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=0, keepdim=True))  # each prototype gets total mass 1/K ...
        q /= n_prototypes
        q /= q.sum(dim=1, keepdim=True)  # ... and each sample mass 1/N
        q /= n_samples
    return q.mul_(n_samples)
