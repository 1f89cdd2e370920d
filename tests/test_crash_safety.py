"""Fine-tuning checkpoints that no kill or half-written file can break, real nnU-Net trainers on a tiny
hand-written plans (as in test_trainer_env.py: no data is read). The end-to-end counterparts, with
signals and nnUNetv2_train, are in test_e2e_crash_safety.py."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.durable_files import remove_stale_temporaries as remove_stale_temp_files
from nnunet_meddinov3.nnunet_checkpoints import CheckpointUnreadable, unreadable_reason
from nnunet_meddinov3.stop_signals import StopSignals
from nnunet_meddinov3.training.recipe import RecipeError
from nnunet_meddinov3.training.trainer import nnUNetTrainerMedDINOv3_Tiny, read_recorded_recipe
from test_cli_errors import nnunet_env, predict  # noqa: F401 (a fixture)
from test_trainer_env import DATASET_JSON, make_trainer, nnunet_folders, tiny_plans  # noqa: F401 (a fixture)


def _saved(trainer, name: str, epoch: int) -> str:
    """``name`` in the trainer's output folder, as nnU-Net writes it after ``epoch`` epochs."""
    if not trainer.was_initialized:
        trainer.initialize()
    os.makedirs(trainer.output_folder, exist_ok=True)
    trainer.current_epoch = epoch - 1
    path = os.path.join(trainer.output_folder, name)
    trainer.save_checkpoint(path)
    return path


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])  # what a write killed halfway left in place


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (stand-in)")


def test_a_failed_write_leaves_the_previous_checkpoint_intact(nnunet_folders):
    trainer = make_trainer()
    latest = _saved(trainer, "checkpoint_latest.pth", epoch=1)
    trainer.my_init_kwargs["unsaveable"] = _Unpicklable()  # the write fails after the file was opened
    trainer.current_epoch = 4
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.save_checkpoint(latest)
    assert torch.load(latest, weights_only=False)["current_epoch"] == 1
    assert [n for n in os.listdir(trainer.output_folder) if n.endswith(".pth") or n.endswith(".tmp")] == [
        "checkpoint_latest.pth"]  # no temporary file left
    # nnU-Net's own save_checkpoint, the same failure: the file it replaced in place is gone
    with pytest.raises(RuntimeError, match="disk full"):
        nnUNetTrainer.save_checkpoint(trainer, latest)
    assert unreadable_reason(latest) is not None


STALL_AND_SAVE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from test_trainer_env import make_trainer

class Stall:  # pickled while torch.save is writing: a kill lands in the middle of the write
    def __reduce__(self):
        open(sys.argv[2], "w").close()
        time.sleep(120)

trainer = make_trainer()
trainer.initialize()
os.makedirs(trainer.output_folder, exist_ok=True)
path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
trainer.save_checkpoint(path)
trainer.current_epoch = 5
trainer.my_init_kwargs["stall"] = Stall()
trainer.save_checkpoint(path)
"""


def test_kill_9_during_a_write_leaves_the_previous_checkpoint(nnunet_folders, tmp_path):
    marker = tmp_path / "writing"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", STALL_AND_SAVE, str(Path(__file__).parent), str(marker)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not marker.exists():
        assert child.poll() is None and time.time() < deadline, child.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    child.kill()
    child.wait(timeout=30)
    folder = next((tmp_path / "results").glob("*/*/fold_0"))
    assert torch.load(folder / "checkpoint_latest.pth", weights_only=False)["current_epoch"] == 1
    stale = list(folder.glob(".checkpoint_latest.pth.*.tmp"))
    assert len(stale) == 1  # the killed write's own file: removed when a training next starts there
    assert remove_stale_temp_files(str(folder)) == [str(stale[0])] and not stale[0].exists()


def test_c_goes_on_from_the_newest_readable_checkpoint_and_names_the_bad_ones(nnunet_folders):
    trainer = make_trainer()
    best = _saved(trainer, "checkpoint_best.pth", epoch=1)
    latest = _saved(trainer, "checkpoint_latest.pth", epoch=2)
    final = _saved(trainer, "checkpoint_final.pth", epoch=3)
    _truncate(final)
    with pytest.raises(CheckpointUnreadable, match=r"checkpoint_final\.pth cannot be read \(.*central directory"):
        read_recorded_recipe(final)

    resumed = make_trainer(continue_training=True)
    resumed.load_checkpoint(final)  # what nnU-Net's --c asks for: final exists
    assert resumed.current_epoch == 2 and resumed.resumed_from == latest
    log = open(resumed.log_file).read()
    assert f"WARNING: {final} cannot be read" in log and "Going on from checkpoint_latest.pth" in log

    Path(latest).write_bytes(b"")
    resumed = make_trainer(continue_training=True)
    resumed.load_checkpoint(final)
    assert resumed.current_epoch == 1 and resumed.resumed_from == best
    assert f"{latest} cannot be read (empty file)" in open(resumed.log_file).read()

    _truncate(best)
    with pytest.raises(CheckpointUnreadable, match=r"no readable checkpoint: checkpoint_final\.pth: .*; "
                                                   r"checkpoint_latest\.pth: empty file; checkpoint_best\.pth: .*"
                                                   r"Move these files aside"):
        make_trainer(continue_training=True).load_checkpoint(final)
    # --val validates the final model or nothing: no fallback
    with pytest.raises(CheckpointUnreadable, match=r"checkpoint_final\.pth cannot be read"):
        make_trainer().load_checkpoint(final)


class _ThreeEpochs(nnUNetTrainerMedDINOv3_Tiny):
    """The nnU-Net idiom for a variant (nnUNetTrainer_5epochs): set the attribute after super().__init__()."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3


def _variant(cls=_ThreeEpochs, **kwargs):
    return cls(tiny_plans(**kwargs), "2d", 0, dict(DATASET_JSON), device=torch.device("cpu"))


def test_c_keeps_a_schedule_set_in_a_subclass_init(nnunet_folders, monkeypatch):
    trainer = _variant()
    trainer.initialize()
    assert trainer.num_epochs == 3 and trainer.lr_scheduler.total_epochs == 3
    record = trainer.my_init_kwargs[recipe.CHECKPOINT_KEY]
    assert record["values"]["epochs"] == 3 and record["sources"]["epochs"] == "trainer _ThreeEpochs (__init__)"
    latest = _saved(trainer, "checkpoint_latest.pth", epoch=1)

    resumed = _variant(continue_training=True)
    resumed.load_checkpoint(latest)
    assert (resumed.num_epochs, resumed.current_epoch, resumed.lr_scheduler.total_epochs) == (3, 1, 3)

    # the assignment is the subclass's default: the explicit override still wins, and is recorded
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "epochs=5")
    overridden = _variant()
    overridden.initialize()
    assert overridden.num_epochs == 5 and overridden.recipe_sources["epochs"] == recipe.OVERRIDE_ENV
    monkeypatch.delenv("MEDDINOV3_RECIPE_OVERRIDE")

    # the lock still holds: a subclass whose __init__ now says otherwise cannot resume the run silently
    class _FourEpochs(nnUNetTrainerMedDINOv3_Tiny):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 4

    _FourEpochs.__name__ = "_ThreeEpochs"
    with pytest.raises(RecipeError, match=r"checkpoint epochs=3 \(trainer _ThreeEpochs \(__init__\)\), now epochs=4"):
        _variant(_FourEpochs, continue_training=True).load_checkpoint(latest)


def test_a_checkpoint_recorded_before_the_fix_resumes_with_the_schedule_the_run_used(nnunet_folders):
    trainer = _variant()
    latest = _saved(trainer, "checkpoint_latest.pth", epoch=1)
    checkpoint = torch.load(latest, weights_only=False)
    record = checkpoint["init_args"][recipe.CHECKPOINT_KEY]  # as the earlier version recorded it: the class default
    record["values"]["epochs"], record["sources"]["epochs"] = 20, "trainer _ThreeEpochs"
    torch.save(checkpoint, latest)
    resumed = _variant(continue_training=True)
    resumed.load_checkpoint(latest)
    assert resumed.num_epochs == 3


def test_stop_signals_record_the_first_deliver_the_second_and_restore_the_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.requested == signal.SIGUSR1 and seen == []  # recorded, the process goes on
            os.kill(os.getpid(), signal.SIGUSR1)  # a second one: the previous handler has it at once
            assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and stop.requested is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_meddinov3_predict_names_the_unreadable_checkpoint_and_the_intact_one(capsys, nnunet_env):
    fold = nnunet_env["model"] / "fold_0"
    torch.save({"network_weights": {}, "current_epoch": 1}, fold / "checkpoint_latest.pth")
    data = (fold / "checkpoint_latest.pth").read_bytes()
    (fold / "checkpoint_final.pth").write_bytes(data[: len(data) // 2])
    code, out = predict(capsys, nnunet_env, "-npp", "0", "-nps", "0")
    assert code == 2 and f"{fold / 'checkpoint_final.pth'} cannot be read (" in out
    assert "Intact in fold_0: checkpoint_latest.pth (predict with -chk NAME)" in out and "--c" in out
