"""sinkhorn_knopp under torch.distributed equals the single-process result on the whole batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses import sinkhorn_knopp

ROWS_PER_RANK = (5, 3)  # unequal, as masked-patch counts are for iBOT


def _logits() -> torch.Tensor:
    return 3 * torch.randn(sum(ROWS_PER_RANK), 6, generator=torch.Generator().manual_seed(0))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(ROWS_PER_RANK))
    try:
        start = sum(ROWS_PER_RANK[:rank])
        local = _logits()[start : start + ROWS_PER_RANK[rank]]
        torch.save(sinkhorn_knopp(local, teacher_temp=0.1), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_all_reduces_like_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=len(ROWS_PER_RANK), join=True)
    gathered = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(len(ROWS_PER_RANK))])
    torch.testing.assert_close(gathered, sinkhorn_knopp(_logits(), teacher_temp=0.1))
