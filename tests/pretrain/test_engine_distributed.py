"""Real processes: a 2-process torchrun (gloo) run, and a SIGTERM-ed run resumed bit for bit."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from pretrain_synthetic import ct_volume, write_nifti

from pretrain.configs import load_config
from pretrain.engine import FINISHED, train
from pretrain.engine.checkpoint import list_checkpoints, read_training_checkpoint
from pretrain.engine.run_record import read_run_status
from pretrain.engine.progress import read_metrics


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(20 + i))
    return root


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def slice_cache(data_root, tmp_path_factory):
    """The slice cache, built once by `python -m pretrain cache`: the torchrun runs below then start
    from a complete cache instead of each building it on both ranks (spawned workers importing torch
    made that 4 processes on 2 busy cores, and the run overran its timeout)."""
    cache = tmp_path_factory.mktemp("slice_cache")
    command = [sys.executable, "-m", "pretrain", "cache", "--config", "tiny_stage1", "--data", str(data_root),
               "--cache-dir", str(cache), "--workers", "1"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cache


def _torchrun(data_root, run, *overrides):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pretrain", "train", "--config", "tiny_stage1", "--data", str(data_root), "--output", str(run),
               "train.iterations=4", "train.checkpoint_every=2", "data.batch_size=4", "optim.global_batch_size=16",
               # KoLeo neighbours across both ranks: its backward all-reduce runs inside DDP's/FSDP's
               "loss.koleo_group_size=8", *overrides]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_torchrun_two_processes_gloo_ddp_and_fsdp(data_root, slice_cache, tmp_path):
    cache = f"data.cache_dir={slice_cache}"
    run = tmp_path / "ddp"
    _torchrun(data_root, run, cache)
    status = read_run_status(run)
    # 2 processes x batch 4, accumulated twice to the global batch of 16
    assert status["status"] == FINISHED and status["processes"] == 2 and status["accumulation"] == 2
    assert [i for i, _ in list_checkpoints(run)] == [2, 4]
    state = read_training_checkpoint(run)
    assert len(state["rng"]) == 2  # one RNG state per rank
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["stage_record"]["global_batch_size"] == 16
    assert all(torch.isfinite(v).all() for v in state["teacher"].values())
    assert [m["iteration"] for m in read_metrics(run)] == [1, 2, 3, 4]  # rank 0 alone writes the log

    # FSDP2 (fully_shard) computes the same step: the gathered checkpoints agree
    _torchrun(data_root, tmp_path / "fsdp", "train.parallel=fsdp", cache)
    sharded = read_training_checkpoint(tmp_path / "fsdp")
    for key, value in state["teacher"].items():
        torch.testing.assert_close(sharded["teacher"][key], value, rtol=1e-4, atol=1e-5)
    assert sharded["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()


def test_sigterm_checkpoints_and_resume_reproduces_the_uninterrupted_run(data_root, tmp_path):
    run = tmp_path / "killed"
    common = ["train.iterations=400", "train.checkpoint_every=3", "train.log_every=1"]
    command = [sys.executable, "-m", "pretrain", "train", "--config", "tiny_stage1", "--data", str(data_root),
               "--output", str(run), *common]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(run):
            assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    status = read_run_status(run)
    stopped = status["iteration"]
    assert status["status"] == "paused" and "SIGTERM" in status["message"] and 3 <= stopped < 400
    assert list_checkpoints(run)[-1][0] == stopped  # a checkpoint at the stop, not only the periodic ones

    target = stopped + 2
    resumed = subprocess.run([*command, "--resume", f"train.max_iterations={target}"], env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config("tiny_stage1", [f"data.roots=[{data_root}]", *common, f"train.max_iterations={target}"])
        train(config, tmp_path / "straight")
    finally:
        torch.set_num_threads(threads)
    a, b = read_training_checkpoint(tmp_path / "straight"), read_training_checkpoint(run)
    assert a["iteration"] == b["iteration"] == target
    for key, value in a["teacher"].items():
        assert torch.equal(value, b["teacher"][key]), key
