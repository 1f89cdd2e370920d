"""`python -m pretrain benchmark-data`: multi-crop samples/s per loader worker and bytes read per
sample from a cold slice cache, against what a GPU takes (nnunet_meddinov3/benchmark/RESULTS.md)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from nnunet_meddinov3.network.configs import resolve_encoder_config

from ..data.cache_report import read_bytes, cache_size
from ..data.slice_store import drop_from_page_cache
from .data import build_loader, build_slice_dataset


def benchmark_loader(config, cache_dir: Path, workers: int, samples: int, need: float) -> str:
    """Time ``samples`` multi-crop samples through the training loader with ``workers`` workers
    (0: in this process) from a cold cache; the report compares them with ``need`` images/s."""
    config.data.num_workers = workers
    slices = build_slice_dataset(config, cache_dir, workers=max(workers, 1))
    slices.require_slices()
    for volume in slices.volumes:
        drop_from_page_cache(slices.cache_dir / volume["cache_file"])
    batch = config.data.batch_size
    batches = math.ceil(samples / batch)
    patch = resolve_encoder_config(config.model.encoder).patch_size
    loader = build_loader(config, slices, 0, 1, 1, 0, batches + 1, pin_memory=False, patch_size=patch)
    before = read_bytes([os.getpid()]) if not workers else 0  # a worker's count starts at 0
    iterator = iter(loader)
    next(iterator)  # workers started, first batch made: not timed
    pids = [w.pid for w in getattr(iterator, "_workers", [])] or [os.getpid()]
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    # every batch is made by now (nothing is left to prefetch): bytes over all of them, warm-up included
    read = read_bytes(pids) - before
    del iterator
    made = batches * batch
    rate = made / seconds
    per_worker = rate / max(workers, 1)
    per_sample = read / (made + batch)
    stored = cache_size(slices) / max(len(slices), 1)
    lines = [
        f"{made} samples of {config.name} ({len(config.crops.global_sizes)} crop size(s), {config.crops.n_local} local "
        f"crops) from {len(slices)} cached slices, page cache dropped first, {workers} loader worker(s):",
        f"  {rate:.1f} samples/s, {per_worker:.1f} samples/s per worker",
        f"  read from storage: {per_sample / 1e3:.1f} kB per sample (a stored slice is {stored / 1e3:.1f} kB on "
        "average)",
        f"  a GPU taking {need:.0f} images/s needs {math.ceil(need / per_worker)} worker(s) and "
        f"{need * per_sample / 1e6:.1f} MB/s of random reads",
    ]
    if made + batch > len(slices):
        lines.append(f"  note: {made} samples from {len(slices)} slices re-read some slices from the page cache")
    return "\n".join(lines)
