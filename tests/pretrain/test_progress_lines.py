"""Pretraining's progress where no terminal shows a bar (a pipe, a batch job's log, ``meddinov3 demo``): plain
lines with the iteration, the losses and an ETA, which the demo passes through; and its CPU thread count."""

from __future__ import annotations

import re

import pytest
import torch
from pretrain_synthetic import ct_volume, write_nifti

from nnunet_meddinov3.cli.demo import is_progress_line
from nnunet_meddinov3.cpu_threads import free_core_threads
from pretrain.configs import load_config
from pretrain.engine import FINISHED, train
from pretrain.engine import distributed
from pretrain.engine.distributed import DistributedContext
from pretrain.engine.progress import ProgressReporter

LINE = re.compile(r"^\[run\] iteration (\d+)/3 \(\d+%\) \| total_loss \S+ dino_loss \S+ ibot_loss \S+ koleo_loss \S+ "
                  r"lr \S+ \| \S+ s/it \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")


def test_a_run_without_a_terminal_prints_progress_lines_the_demo_shows(tmp_path, capsys):
    """tiny_stage1 with its bar asked for, its output captured (not a terminal): no bar, but a line after the
    first iteration and one at the last (3 iterations take less than the 10 s between lines)."""
    root = tmp_path / "volumes"
    for i in range(2):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(20 + i))
    config = load_config("tiny_stage1", [f"data.roots=[{root}]", f"data.cache_dir={tmp_path / 'cache'}",
                                         "train.iterations=3", "train.checkpoint_every=0", "train.progress_bar=true"])
    assert train(config, tmp_path / "run").status == FINISHED
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if LINE.match(line)]
    assert [int(LINE.match(line).group(1)) for line in lines] == [1, 3], out
    assert lines[-1].endswith("ETA 0:00:00")
    assert "it/s]" not in err and "s/it]" not in err  # no tqdm bar
    finished = next(line for line in out.splitlines() if "finished at iteration 3" in line)
    assert all(is_progress_line(line) for line in [*lines, finished])


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def _run_dir(tmp_path, name="run"):
    (tmp_path / name).mkdir()
    return tmp_path / name


def test_lines_come_at_most_every_interval_and_at_the_end(tmp_path, capsys):
    now = [0.0]
    reporter = ProgressReporter(_run_dir(tmp_path), total=40, start=0, enabled=True, bar=False, clock=lambda: now[0])
    for i in range(40):
        now[0] += 8.0 if i == 0 else 3.0  # a slow first iteration (start-up), then 3 s each
        reporter.step({"total_loss": 1.0})
    done = [int(re.search(r"iteration (\d+)/40", line).group(1)) for line in _lines(capsys)]
    assert done == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 40]  # the first, then every 12 s (>= 10 s), the last


def test_the_rate_leaves_the_start_up_out_and_non_finite_losses_show(tmp_path, capsys):
    now = [0.0]
    reporter = ProgressReporter(_run_dir(tmp_path), total=10, start=0, enabled=True, bar=False, clock=lambda: now[0])
    for i in range(10):
        now[0] += 30.0 if i == 0 else 2.0
        reporter.step({"total_loss": 2.5, "dino_loss": float("nan"), "lr": 1e-4, "finite": False})
    first, second, *_ = _lines(capsys)
    assert first == ("[run] iteration 1/10 (10%) | total_loss 2.5 dino_loss nan lr 0.0001 | 30 s/it | "
                     "elapsed 0:00:30 | ETA 0:04:30")
    # 10 s after the first line: (40 - 30) s over the 5 iterations after the first
    assert second.endswith("iteration 6/10 (60%) | total_loss 2.5 dino_loss nan lr 0.0001 | 2 s/it | "
                           "elapsed 0:00:40 | ETA 0:00:08")


def test_a_resumed_run_counts_from_where_it_resumed(tmp_path, capsys):
    now = [0.0]
    reporter = ProgressReporter(_run_dir(tmp_path), total=100, start=90, enabled=True, bar=False, clock=lambda: now[0])
    now[0] = 1.0
    reporter.step({"total_loss": 1.0})
    assert "iteration 91/100 (91%)" in _lines(capsys)[0]
    ProgressReporter(_run_dir(tmp_path, "other"), total=5, start=0, enabled=False, bar=False).step({"total_loss": 1.0})
    assert _lines(capsys) == []  # not rank 0: nothing


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_pretraining_takes_the_cores_its_loader_workers_leave(monkeypatch, capsys, restore_threads):
    monkeypatch.setattr(distributed, "_announced_threads", set())
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    context = DistributedContext(device=torch.device("cpu"))
    torch.set_num_threads(7)
    # the cores the loader leaves, less those other jobs hold right now
    chosen = context.use_free_cpu_threads(1)
    assert 1 <= chosen <= free_core_threads(1) and chosen == torch.get_num_threads()
    assert 1 <= context.use_free_cpu_threads(1) <= free_core_threads(1)
    said = capsys.readouterr().out
    assert said.count("CPU thread(s) for torch") == 1 and "minus 1 loader worker(s)" in said  # said once

    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    torch.set_num_threads(3)
    assert context.use_free_cpu_threads(0) is None and torch.get_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert DistributedContext(device=torch.device("meta")).use_free_cpu_threads(0) is None  # not a CPU run
    assert torch.get_num_threads() == 3
