"""Stop signals, --c and damaged checkpoints through the real nnUNetv2_train, with nnU-Net's background
augmentation workers running (nnUNet_n_proc_DA=2), on the session's tiny synthetic dataset planned by the
stock nnUNetv2_plan_and_preprocess (tests/conftest.py: stock_planned_ct), into results of its own.

The trainer is a variant written the nnU-Net way (``self.num_epochs = 3`` after ``super().__init__()``),
found through nnUNet_extTrainer like any user's trainer: --c must keep its 3 epochs (the Tiny class
says 20) and leave the finished run alone.
"""
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from e2e_helpers import run

pytestmark = pytest.mark.e2e

TRAINER = "nnUNetTrainerMedDINOv3_TinyThreeEpochsCrashTest"
VARIANT = f'''
import torch
from nnunet_meddinov3.training.trainer import nnUNetTrainerMedDINOv3_Tiny


class {TRAINER}(nnUNetTrainerMedDINOv3_Tiny):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, stock_planned_ct):
    root = tmp_path_factory.mktemp("crash")
    # the shared dataset's raw and preprocessed folders, read only; results and caches here
    env = dict(stock_planned_ct["env"], nnUNet_results=str(root / "res"), MEDDINOV3_CACHE=str(root / "cache"))
    variants = root / "variants"
    variants.mkdir()
    (variants / "crash_safety_test_variants.py").write_text(VARIANT)
    ours = run(["meddinov3", "env", "--export"], env, root).stdout.strip().split("=", 1)[1].strip("'")
    env.update(nnUNet_extTrainer=f"{ours}:{variants}", nnUNet_n_proc_DA="2", PYTHONUNBUFFERED="1",
               MEDDINOV3_RECIPE_OVERRIDE="iterations=12 val_iterations=1")
    fold = root / "res" / stock_planned_ct["name"] / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    return {"root": root, "env": env, "fold": fold,
            "train": ["nnUNetv2_train", str(stock_planned_ct["id"]), "2d", "0", "-tr", TRAINER, "-device", "cpu"]}


def _wait_for_log(fold: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}"
        if any(text in log.read_text() for log in fold.glob("training_log_*.txt")):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the training log after {timeout} s")


@pytest.fixture(scope="module")
def interrupted(workspace):
    """A training stopped by SIGTERM to its whole process group (as SLURM and `docker stop` of a shell
    do: the augmentation workers get it too) during its second epoch."""
    ws = workspace
    proc = subprocess.Popen(ws["train"], env=ws["env"], cwd=ws["root"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_log(ws["fold"], "Epoch 1", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)  # let the kernel reap what is left of the group
    with pytest.raises(ProcessLookupError):  # no augmentation worker outlived the trainer
        os.killpg(proc.pid, 0)
    latest = ws["fold"] / "checkpoint_latest.pth"
    saved = ws["root"] / "interrupted_latest.pth"
    saved.write_bytes(latest.read_bytes())
    return {"returncode": proc.returncode, "out": out, "latest": saved}


def test_sigterm_leaves_a_loadable_latest_and_says_how_to_resume(workspace, interrupted):
    ws = workspace
    assert interrupted["returncode"] == 128 + signal.SIGTERM, interrupted["out"][-3000:]
    out = interrupted["out"]
    assert "Traceback" not in out and "SIGTERM received: stopping at the end of the current iteration" in out
    assert "Stopped by SIGTERM in epoch" in out and f"-tr {TRAINER} -p nnUNetPlans --c" in out
    checkpoint = torch.load(interrupted["latest"], weights_only=False)
    assert checkpoint["current_epoch"] in (1, 2)  # the epoch it was in, to be restarted
    assert all(len(values) == checkpoint["current_epoch"] for values in checkpoint["logging"].values())
    assert not (ws["fold"] / "checkpoint_final.pth").exists() and not list(ws["fold"].glob(".*.tmp"))


def _finish(ws) -> str:
    return run(ws["train"] + ["--c"], ws["env"], ws["root"]).stdout


def test_c_finishes_the_interrupted_run_with_the_subclass_schedule(workspace, interrupted):
    ws = workspace
    epoch = torch.load(interrupted["latest"], weights_only=False)["current_epoch"]
    resumed = _finish(ws)
    assert f"Epoch {epoch}" in resumed and "Epoch 3" not in resumed and "Epoch 0\n" not in resumed
    checkpoint = torch.load(ws["fold"] / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["current_epoch"] == 3  # the subclass's 3, not Tiny's 20
    assert checkpoint["init_args"]["meddinov3_recipe"]["sources"]["epochs"] == f"trainer {TRAINER} (__init__)"
    assert (ws["fold"] / "validation" / "summary.json").exists()


def test_c_on_a_finished_run_trains_nothing_and_keeps_its_final_checkpoint(workspace, interrupted):
    ws = workspace
    final = ws["fold"] / "checkpoint_final.pth"
    if not final.exists():  # when run on its own
        _finish(ws)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    again = _finish(ws)
    assert "This training is finished" in again and "does not train it again" in again
    assert "Epoch " not in again and "The final validation was done already" in again
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest


def test_c_goes_on_from_latest_when_final_is_truncated(workspace, interrupted):
    ws = workspace
    (ws["fold"] / "checkpoint_latest.pth").write_bytes(interrupted["latest"].read_bytes())
    data = interrupted["latest"].read_bytes()
    (ws["fold"] / "checkpoint_final.pth").write_bytes(data[: len(data) // 2])  # a write killed halfway
    resumed = run(ws["train"] + ["--c"], ws["env"], ws["root"]).stdout
    assert "checkpoint_final.pth cannot be read" in resumed and "Going on from checkpoint_latest.pth" in resumed
    assert "Traceback" not in resumed
    assert torch.load(ws["fold"] / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 3
