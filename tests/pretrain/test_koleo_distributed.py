"""Distributed KoLeo (DINOv3's high-resolution stage): neighbours searched across the ranks of a
group equal the single-process loss on that group, gradients included."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses import KoLeoLoss

WORLD, LOCAL, DIM = 4, 3, 5


def _features() -> torch.Tensor:
    return torch.randn(WORLD * LOCAL, DIM, generator=torch.Generator().manual_seed(0))


def _worker(rank: int, init_file: str, out_dir: str, group_size) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = _features()[rank * LOCAL:(rank + 1) * LOCAL].clone().requires_grad_(True)
        loss = KoLeoLoss(group_size=group_size)(local)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, group_size) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), group_size), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KoLeo terms over ``rows`` as one batch, and the gradient of their sum."""
    x = rows.clone().requires_grad_(True)
    xn = torch.nn.functional.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.diag(torch.full((len(rows),), float("inf")))
    terms = -torch.log(d.min(dim=1).values + 1e-8)
    terms.sum().backward()
    return terms.detach(), x.grad


@pytest.mark.parametrize("group_size", [6, 100])  # two groups of two ranks; one group (capped at 12)
def test_group_of_ranks_equals_one_process_on_the_group(tmp_path, group_size):
    results = _run(tmp_path, group_size)
    group = min(group_size, WORLD * LOCAL)
    for first in range(0, WORLD * LOCAL, group):
        terms, grad_of_sum = _single_process(_features()[first:first + group])
        for r in range(first // LOCAL, (first + group) // LOCAL):
            mine = slice(r * LOCAL - first, (r + 1) * LOCAL - first)
            torch.testing.assert_close(results[r]["loss"], terms[mine].mean(), rtol=1e-5, atol=1e-6)
            # every rank's backward of its own mean: the rows' gradient is that of the summed terms / LOCAL
            torch.testing.assert_close(results[r]["grad"], grad_of_sum[mine] / LOCAL, rtol=1e-4, atol=1e-6)


def test_without_group_each_rank_keeps_its_own_batch(tmp_path):
    results = _run(tmp_path, None)
    for r in range(WORLD):
        terms, _ = _single_process(_features()[r * LOCAL:(r + 1) * LOCAL])
        torch.testing.assert_close(results[r]["loss"], terms.mean(), rtol=1e-5, atol=1e-6)


def test_group_not_made_of_whole_rank_batches_is_refused(tmp_path):
    with pytest.raises(Exception, match="divide the per-rank batch 3, or be a multiple of it that divides the global batch 12"):
        _run(tmp_path, 4)


def test_one_process_uses_its_batch_or_groups_of_its_rows():
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(KoLeoLoss(group_size=16)(x), KoLeoLoss()(x), rtol=0, atol=0)  # capped at 4
    # smaller than the batch: groups of adjacent rows, each its own neighbour set (so one step of
    # N x B images equals N accumulation micro-steps of B)
    halves = (KoLeoLoss()(x[:2]) + KoLeoLoss()(x[2:])) / 2
    torch.testing.assert_close(KoLeoLoss(group_size=2)(x), halves, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(KoLeoLoss(group_size=2)(x), KoLeoLoss()(x))
    with pytest.raises(ValueError, match="divide the per-rank batch 4"):
        KoLeoLoss(group_size=3)(x)
