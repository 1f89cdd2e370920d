"""The CPU thread count the demo gives its steps and pretraining gives torch: the cores the loader workers
leave, from the affinity mask (and a container's CPU quota)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nnunet_meddinov3.cpu_threads import (
    available_cores,
    cgroup_cpu_limit,
    cpu_times,
    describe_choice,
    free_core_threads,
    idle_cores,
    threads_set_by_user,
)


def test_free_cores_are_the_cores_less_the_loader_workers_at_least_one():
    cores = available_cores()
    assert cores >= 1
    assert free_core_threads(0) == cores
    assert free_core_threads(1) == max(1, cores - 1)
    assert free_core_threads(cores + 5) == 1
    # two processes on the node (torchrun), one loader worker each: the rest shared out
    assert free_core_threads(1, processes=2) == max(1, (cores - 2) // 2)
    assert f"{free_core_threads(1)} CPU thread(s) for torch: {cores} available core(s) minus 1 loader worker(s)" \
        in describe_choice(free_core_threads(1), 1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity call on this OS")
def test_the_affinity_mask_is_what_counts():
    """A process pinned to one core (taskset, a batch job's allocation) gets one thread, whatever the host has."""
    pinned = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
              "from nnunet_meddinov3.cpu_threads import available_cores, free_core_threads; "
              "print(available_cores(), free_core_threads(0), free_core_threads(3))")
    out = subprocess.run([sys.executable, "-c", pinned], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "1"]


def test_a_container_cpu_quota_caps_the_cores(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_an_omp_num_threads_the_user_set_is_theirs():
    assert threads_set_by_user({"OMP_NUM_THREADS": "3"}) == 3
    assert threads_set_by_user({"OMP_NUM_THREADS": " 2 "}) == 2
    for unset in ({}, {"OMP_NUM_THREADS": ""}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "four"}):
        assert threads_set_by_user(unset) is None  # OpenMP ignores these too


def test_cores_other_jobs_keep_busy_are_not_counted():
    cores = available_cores()
    # two /proc/stat readings half a second apart: 3 of every 4 ticks idle
    readings = iter([(1000, 2000), (1300, 2400)])
    idle = idle_cores(0, times=lambda: next(readings))
    assert idle == pytest.approx(0.75 * (os.cpu_count() or 1))
    assert free_core_threads(0, idle=0.4) == 1  # every core busy with other jobs: one thread
    assert free_core_threads(0, idle=cores + 8) == cores  # an idle host: the cores this process may use
    assert idle_cores(0, times=lambda: None) is None  # no /proc/stat: nothing is subtracted
    assert free_core_threads(0, idle=None) == cores
    stat = cpu_times()
    assert stat is None or 0 <= stat[0] <= stat[1]
