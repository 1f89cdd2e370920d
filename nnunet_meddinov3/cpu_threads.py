"""How many intra-op threads torch should use on a CPU: the cores left free by the data loader's workers.

torch's default is one thread per core, whatever else runs there. Its OpenMP threads spin-wait between
operations, so on cores shared with loader workers (or other jobs) they burn the time the others need:
measured on a loaded 2-core machine, 60 iterations of pretraining took 435 s with 2 threads and 82 s with
one. So the count also leaves out the cores other jobs are busy with right now (sampled from /proc/stat over
half a second: unlike the load average, this does not lag behind the previous step). An OMP_NUM_THREADS the
user set always wins. Standard library only: the command lines compute this
before they import torch, and for child processes that import it themselves.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

THREADS_ENV = "OMP_NUM_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")
STAT_FILE = Path("/proc/stat")
IDLE_SAMPLE_S = 0.5


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The CPU quota of this process's container in whole cores (rounded up), or None without one.

    A container limited to 2 CPUs on a 64-core host sees all 64 in its affinity mask; the quota is what it
    may actually use. cgroup v2 (``cpu.max``: "QUOTA PERIOD" or "max PERIOD"), else v1."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (root / quota_file).read_text().split()
            if period_file is not None:
                fields = [fields[0], (root / period_file).read_text().strip()]
            quota, period = fields[0], fields[1]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return max(1, math.ceil(int(quota) / int(period)))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def available_cores() -> int:
    """The cores this process may run on: its affinity mask (a taskset, a batch job's allocation), capped by
    its container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def cpu_times(stat_file: Path = STAT_FILE) -> tuple[int, int] | None:
    """(idle, total) clock ticks of all the host's cores since boot (idle counts iowait too), or None
    where there is no /proc/stat."""
    try:
        values = [int(v) for v in stat_file.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)


def idle_cores(sample_s: float = IDLE_SAMPLE_S, times=cpu_times) -> float | None:
    """How many of the host's cores were idle over the next ``sample_s`` seconds (None where it cannot tell)."""
    before = times()
    time.sleep(sample_s)
    after = times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def free_core_threads(loader_workers: int, processes: int = 1, idle: float | None = None) -> int:
    """Threads for each of ``processes`` compute processes (torchrun's processes on one node), each with
    ``loader_workers`` data-loading processes of its own: the cores the loaders leave, of those other jobs
    leave ``idle`` (where given), shared out, at least 1."""
    processes = max(1, processes)
    cores = available_cores() if idle is None else min(available_cores(), max(1, round(idle)))
    free = cores - processes * max(0, loader_workers)
    return max(1, free // processes)


def choose_threads(loader_workers: int, processes: int = 1) -> tuple[int, str] | None:
    """(threads, why) for a CPU process about to start ``loader_workers`` loaders: the free cores, sampled now;
    None where the user set OMP_NUM_THREADS (theirs holds)."""
    if threads_set_by_user() is not None:
        return None
    idle = idle_cores()
    threads = free_core_threads(loader_workers, processes, idle)
    return threads, describe_choice(threads, loader_workers, processes, idle)


def threads_set_by_user(environ=None) -> int | None:
    """OMP_NUM_THREADS as a positive whole number, or None if it is unset (or not one: OpenMP ignores it too)."""
    value = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def describe_choice(threads: int, loader_workers: int, processes: int = 1, idle: float | None = None) -> str:
    """One line for the log: the count and where it comes from."""
    per_process = f" per process ({processes} processes)" if processes > 1 else ""
    busy = "" if idle is None else f" ({idle:.1f} idle now: other jobs hold the rest)"
    return (f"{threads} CPU thread(s){per_process} for torch: {available_cores()} available core(s){busy} minus "
            f"{loader_workers} loader worker(s){' each' if processes > 1 else ''}; set {THREADS_ENV} to choose")
