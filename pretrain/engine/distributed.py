"""Processes, devices, wrappers and precision for single- and multi-node runs.

Launch with ``torchrun`` (``--nproc_per_node=N``; several nodes with ``--nnodes``,
``--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT``): the env:// rendezvous variables it sets are
all that is read here. NCCL on CUDA, gloo on CPU (the tests). A plain ``python -m pretrain``
is one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from nnunet_meddinov3.cpu_threads import choose_threads

_announced_threads: set[int] = set()  # the CPU thread counts this process has logged


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over processes, in place (a no-op for one process)."""
        if self.distributed:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def use_free_cpu_threads(self, loader_workers: int) -> int | None:
        """On a CPU, give torch the cores the ``loader_workers`` of this node's processes leave
        (nnunet_meddinov3.cpu_threads: its default of one thread per core spin-waits against them), unless
        OMP_NUM_THREADS says otherwise; said once on rank 0. The count, or None where nothing was set."""
        choice = None
        if self.device.type == "cpu":
            choice = choose_threads(loader_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if choice is None:
            return None
        threads, why = choice
        torch.set_num_threads(threads)
        if self.is_main and threads not in _announced_threads:  # a chain's stages say it once
            print(why, flush=True)
            _announced_threads.add(threads)
        return threads


def init_distributed(timeout_minutes: float = 30) -> DistributedContext:
    """Join the torchrun process group if there is one; choose the device. ``timeout_minutes`` bounds
    how long a collective waits for the slowest process (``train.distributed_timeout_minutes``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
            device_id=device if cuda else None,
        )
        initialized_here = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistributedContext(rank, world_size, local_rank, device, initialized_here)


def shutdown_distributed(context: DistributedContext) -> None:
    if context.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def _shard_encoder(encoder: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in encoder.vit.blocks:
        fully_shard(block)


def wrap_student(student: nn.Module, context: DistributedContext, parallel: str) -> nn.Module:
    """The module to call for the student's forward: DDP around it, or the FSDP2-sharded module
    itself (``fully_shard`` works in place). One process: the module unchanged."""
    if not context.distributed:
        return student
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        _shard_encoder(student.backbone.encoder)
        fully_shard(student)
        return student
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # buffers (the RoPE periods) never change: no need to re-broadcast them every forward
    # (newer torch renamed the switch; the old name warns there)
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(student, device_ids=device_ids, **no_buffer_sync)


def shard_inference_model(model: nn.Module, context: DistributedContext, parallel: str) -> None:
    """Shard the teacher / Gram teacher like the student under FSDP2 (so the EMA update pairs
    local shards); under DDP every process keeps a full copy."""
    if context.distributed and parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        encoder = model.backbone.encoder if hasattr(model, "backbone") else model
        _shard_encoder(encoder)
        fully_shard(model)
        # these are called instead of forward(): FSDP2 must gather the root's parameters for them too
        for method in ("teacher_forward", "forward_tokens"):
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)


def gradient_sync(module: nn.Module, sync: bool):
    """Context for one micro-step's forward and backward: skip the gradient all-reduce on all but
    the last micro-step of an accumulated iteration."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        return _ResyncOnExit(module)
    return contextlib.nullcontext()


class _ResyncOnExit(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.module = module

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
        return False


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA for ``auto``; fp32 otherwise unless bf16 is asked for."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
