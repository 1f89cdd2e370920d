"""What ``python -m pretrain cache`` prints, and the byte counter of ``python -m pretrain
benchmark-data`` (pretrain/engine/data_benchmark.py): can the loader feed a GPU from a cache that is
not in memory?

The benchmark drops the cache files from the page cache (``POSIX_FADV_DONTNEED``, no root
needed), then times multi-crop samples through the training loader and counts the bytes the
loader processes read from storage (``read_bytes`` of ``/proc/PID/io``, which counts what reached
the disk, read-ahead included).
"""

from __future__ import annotations

import resource
from pathlib import Path

from .slices import SliceDataset


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def cache_size(slices: SliceDataset) -> int:
    return sum(v["cache_size"] for v in slices.volumes)


def describe_cache(slices: SliceDataset) -> str:
    index, stats = slices.index, slices.build_stats
    size, n = cache_size(slices), max(len(slices), 1)
    lines = [f"slice cache {slices.cache_dir}",
             f"  index: {slices.index_path}",
             f"  {index['n_volumes']} volume(s), {len(slices)} kept slice(s), {len(slices.excluded)} excluded by the "
             f"leakage guard, {len(slices.skipped)} skipped as unusable"]
    if slices.skipped:
        lines.append(f"  skipped (also in {slices.index_path.with_suffix('.skipped.json')}):")
        lines += [f"    {v['key']}: {v['error']}" for v in slices.skipped]
    lines.append(f"  on disk: {_mb(size)}, {size / n / 1e3:.1f} kB a kept slice, {size / n * 1e6 / 1e9:.1f} GB per "
                 "million kept slices")
    if stats.built:
        rate = stats.built_slices / max(stats.seconds, 1e-9)
        lines.append(f"  built {stats.built} volume(s) ({stats.built_slices} slices read, {stats.kept_slices} kept) in "
                     f"{stats.seconds:.1f} s: {rate:.1f} slices/s with {stats.workers} worker(s), "
                     f"{rate / stats.workers:.1f} slices/s per worker")
    if stats.damaged:
        lines.append(f"  rebuilt {len(stats.damaged)} damaged cache file(s)")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    lines.append(f"  peak memory: {_mb(own)} this process" + (f", {_mb(children)} the largest worker" if stats.workers > 1
                                                             else ""))
    return "\n".join(lines)


def read_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                total += int(line.split()[1])
    return total
