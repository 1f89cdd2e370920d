"""Pretraining survives what clusters and users do to it: kill -9 anywhere (also mid-checkpoint and
mid-cache-build) then --resume, bit for bit; Ctrl-C and SIGUSR1 like SIGTERM; unreadable newest
checkpoints; a slow cache build under torchrun, whose wait for other ranks is no collective."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from pretrain_synthetic import ct_volume, write_nifti

from pretrain.configs import load_config
from pretrain.engine import FINISHED, train
from pretrain.engine.checkpoint import (
    UnreadableCheckpoints,
    checkpoint_dir,
    list_checkpoints,
    read_training_checkpoint,
)
from pretrain.engine.run_record import read_run_status
from pretrain.export import export_run


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(60 + i))
    return root


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _command(data_root, run, *overrides):
    return [sys.executable, "-m", "pretrain", "train", "--config", "tiny_stage1", "--data", str(data_root),
            "--output", str(run), "train.progress_bar=false", *overrides]


def _wait_for(process, condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _after_new_checkpoint(run, delay):
    """A kill condition: ``delay`` seconds after the process writes a checkpoint newer than the ones it
    resumed from, so that the kill lands while iterations are still left to run."""
    resumed_from = None
    seen_at = None

    def when(start):
        nonlocal resumed_from, seen_at
        newest = max((i for i, _ in list_checkpoints(run)), default=0)
        if resumed_from is None:
            resumed_from = newest
        if seen_at is None and newest > resumed_from:
            seen_at = time.time()
        return seen_at is not None and time.time() >= seen_at + delay

    return when


def _in_process(data_root, run, overrides):
    config = load_config("tiny_stage1", [f"data.roots=[{data_root}]", "train.progress_bar=false", *overrides])
    return train(config, run)


def _assert_same_weights(a, b):
    for part in ("student", "teacher"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


def test_kill_9_anywhere_then_resume_is_bit_exact(data_root, tmp_path):
    run = tmp_path / "chaos"
    common = ["train.iterations=8", "train.checkpoint_every=2", "train.log_every=1"]
    slow = ["debug.cache_build_delay_s=0.6", "debug.checkpoint_write_delay_s=0.4"]
    command = _command(data_root, run, "--resume", *common, *slow)
    records = lambda: list((run / "slice_cache").glob("*/records/*.json"))  # noqa: E731
    indexed = lambda: list((run / "slice_cache").glob("*/index-*.json"))  # noqa: E731
    writing = lambda: list(checkpoint_dir(run).glob("*.tmp"))  # noqa: E731
    # (what, when to kill given the start time, what must hold right after the kill)
    kills = [("mid cache build", lambda start: records(), lambda: not indexed()),
             ("mid checkpoint write", lambda start: writing(), writing)]
    # Random moments mid-training, timed from the run's own progress rather than the wall clock: a fast
    # machine must not finish all 8 iterations before the kill (CI once did, 4-9 s after the start).
    for delay in np.random.default_rng(0).uniform(0, 0.3, 2):
        kills.append((f"{delay:.2f} s after a new checkpoint", _after_new_checkpoint(run, delay), None))
    for what, when, then in kills:
        process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            start = time.time()
            _wait_for(process, lambda: when(start))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
            process.stdout.close()
        assert then is None or then(), what
        for _, path in list_checkpoints(run):  # complete or absent, whenever the kill came
            read_training_checkpoint(path)
    final = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert read_run_status(run)["status"] == FINISHED
    assert not writing() and not list((run / "slice_cache").rglob("*.tmp"))

    _in_process(data_root, tmp_path / "straight", common)
    a, b = read_training_checkpoint(tmp_path / "straight"), read_training_checkpoint(run)
    assert a["iteration"] == b["iteration"] == 8
    _assert_same_weights(a, b)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_sigusr1_checkpoint_like_sigterm(data_root, tmp_path, signum):
    run = tmp_path / "stopped"
    command = _command(data_root, run, "train.iterations=400", "train.checkpoint_every=3")
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(process, lambda: list_checkpoints(run))
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    status = read_run_status(run)
    name = signal.Signals(signum).name
    assert status["status"] == "paused" and name in status["message"], status
    assert list_checkpoints(run)[-1][0] == status["iteration"] < 400
    assert "Traceback" not in output


def test_unreadable_checkpoints_and_leftovers(data_root, tmp_path, caplog):
    run = tmp_path / "run"
    common = ["train.iterations=3", "train.checkpoint_every=1"]
    # --resume with nothing to resume from says so, and starts
    config = load_config("tiny_stage1", [f"data.roots=[{data_root}]", "train.progress_bar=false", *common,
                                         "train.max_iterations=2"])
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        train(config, run, resume=True)
    assert any("no checkpoint to resume from" in r.message for r in caplog.records)
    assert [i for i, _ in list_checkpoints(run)] == [1, 2]

    # a cut newest checkpoint and a killed write's leftover
    newest = list_checkpoints(run)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])
    leftover = checkpoint_dir(run) / "checkpoint_00000003.pt.somehost.999999.0123abcd.tmp"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = leftover.with_name(leftover.name.replace("somehost.999999", f"{_host()}.{dead.stdout.strip()}"))
    leftover.write_bytes(b"half a checkpoint")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        export_path, _ = export_run(run, output=tmp_path / "export.safetensors")  # export falls back too
        result = train(load_config("tiny_stage1", [f"data.roots=[{data_root}]", "train.progress_bar=false",
                                                   *common]), run, resume=True)
    assert any("unreadable" in r.message and newest.name in r.message for r in caplog.records)
    assert export_path.is_file() and result.status == FINISHED and result.iteration == 3
    assert not leftover.exists()
    assert newest.with_name(newest.name + ".unreadable").is_file()  # set aside, out of the way
    straight = tmp_path / "straight"
    _in_process(data_root, straight, common)
    _assert_same_weights(read_training_checkpoint(straight), read_training_checkpoint(run))

    # nothing readable at all: an error that says what to do
    for _, path in list_checkpoints(run):
        path.write_bytes(b"")
    with pytest.raises(UnreadableCheckpoints, match="move them away"):
        read_training_checkpoint(run)


def _host():
    from nnunet_meddinov3.durable_files import host_tag as host

    return host()


_BUILD_SHARE = """
import json, sys
from pretrain.configs import load_config
from pretrain.engine.data import build_slice_dataset
rank, data_root, cache_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
config = load_config("tiny_stage1", [f"data.roots=[{data_root}]", "debug.cache_build_delay_s=4"])
dataset = build_slice_dataset(config, cache_dir, rank=rank, world_size=2)
print(json.dumps({"built": dataset.build_stats.built, "awaited": dataset.build_stats.awaited,
                  "slices": len(dataset), "manifest": dataset.index["manifest_sha256"]}))
"""


def test_cache_build_waits_for_other_ranks_without_any_collective(data_root, tmp_path):
    # Two ranks of one build as plain processes, with no process group at all: had the wait for the
    # other's share been a collective, it could not finish. 3 volumes of 4 s each: rank 0 builds two,
    # rank 1 builds one, then waits about 4 s for rank 0's second by watching the records.
    cache_dir = tmp_path / "cache"
    processes = [subprocess.Popen([sys.executable, "-c", _BUILD_SHARE, str(rank), str(data_root), str(cache_dir)],
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [1, 2] and sorted(r["awaited"] for r in results) == [1, 2]
    assert results[0]["manifest"] == results[1]["manifest"] and results[0]["slices"] == results[1]["slices"] > 0


def test_slow_cache_build_under_torchrun_then_trains(data_root, tmp_path):
    # The same slow build under torchrun, collectives on their normal timeout (a short one would also
    # bound training's own collectives, which a busy machine can hold up): each rank builds a share,
    # then training runs and finishes.
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain",
               "train", "--config", "tiny_stage1", "--data", str(data_root), "--output", str(run),
               "train.iterations=1", "train.progress_bar=false", "debug.cache_build_delay_s=4"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_run_status(run)["status"] == FINISHED
    assert "[rank 1]" in done.stderr and "[rank 0]" in done.stderr  # each rank built a share
