"""``meddinov3 demo``'s own machinery, without its 17 minutes: which output lines the console shows, the CPU
threads each step gets, --resume only where there is a checkpoint, and the tables of the finished steps
before a failure."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import types

import pytest
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from tqdm import tqdm

from nnunet_meddinov3.cli import demo
from nnunet_meddinov3.cpu_threads import free_core_threads
from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset


def _args(**changes):
    defaults = dict(epochs=2, iterations=5, num_test=2, pretrain_iterations=0, quick=True, device="cpu")
    return argparse.Namespace(**{**defaults, **changes})


def test_nnunet_epoch_lines_reach_the_console(tmp_path, capsys):
    """The lines nnU-Net's trainer prints at the end of each epoch, as its own print_to_log_file writes them."""
    trainer = types.SimpleNamespace(local_rank=0, log_file=str(tmp_path / "training_log.txt"))
    nnUNetTrainer.print_to_log_file(trainer, "")
    nnUNetTrainer.print_to_log_file(trainer, "Epoch 3")
    nnUNetTrainer.print_to_log_file(trainer, "Current learning rate: 0.00995")
    nnUNetTrainer.print_to_log_file(trainer, "train_loss", -0.4123)
    nnUNetTrainer.print_to_log_file(trainer, "val_loss", -0.3877)
    nnUNetTrainer.print_to_log_file(trainer, "Pseudo dice", [0.81, 0.62, 0.55])
    nnUNetTrainer.print_to_log_file(trainer, "Epoch time: 41.7 s")
    shown = [line for line in capsys.readouterr().out.splitlines() if demo.is_progress_line(line)]
    assert [line.split(": ", 1)[1] for line in shown] == [
        "Epoch 3", "train_loss -0.4123", "val_loss -0.3877", "Pseudo dice [0.81, 0.62, 0.55]", "Epoch time: 41.7 s"]
    assert not demo.is_progress_line("2025-01-01 10:00:00.000000: Current learning rate: 0.00995")  # log only


def test_progress_bars_show_every_ten_seconds_and_when_they_complete():
    """A real tqdm bar as a pipe carries it (its carriage-return updates split into lines, as the demo's
    universal-newline reader splits them), one update every 4 s, twice over (two cases predicted)."""
    updates = io.StringIO()
    for _ in range(2):
        with tqdm(total=8, desc="Preprocessing cases", file=updates, mininterval=0, ascii=True) as bar:
            for _ in range(8):
                bar.update(1)
        updates.write("done with case_000\n")
    lines = updates.getvalue().replace("\r", "\n").split("\n")
    now = [0.0]
    console = demo.ConsoleFilter(clock=lambda: now[0])
    shown = []
    for line in lines:
        if demo.BAR_UPDATE.match(line):
            now[0] += 4.0
        if console.shows(line):
            shown.append(re.sub(r" \[.*", "", line))
    bar = "Preprocessing cases: {:>3}%|{}| {}/8"
    assert shown == [bar.format(25, "##5       ", 2), bar.format(62, "######2   ", 5), bar.format(100, "#" * 10, 8),
                     "done with case_000",
                     bar.format(12, "#2        ", 1), bar.format(50, "#####     ", 4), bar.format(88, "########7 ", 7),
                     bar.format(100, "#" * 10, 8), "done with case_000"]


def test_a_step_runs_with_its_threads_shows_progress_and_fails_with_its_log(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    child = ("import os, sys; print('noise'); print('Epoch 0 with', os.environ['OMP_NUM_THREADS'], 'threads'); "
             "sys.exit(3)")
    threads = demo.step_threads(_args(), loader_workers=1)
    assert threads == free_core_threads(1)
    with pytest.raises(demo.StepFailed, match=r"step 'Train stock' failed \(exit 3\); full log: .*train_stock\.log"):
        demo._step("Train stock", [sys.executable, "-c", child], {"PATH": ""}, tmp_path, threads=threads)
    out = capsys.readouterr().out
    assert f"$ OMP_NUM_THREADS={threads} {sys.executable} -c" in out
    assert f"\n    Epoch 0 with {threads} threads\n" in out and "\n    noise" not in out
    assert (tmp_path / "train_stock.log").read_text() == f"noise\nEpoch 0 with {threads} threads\n"


def test_threads_are_left_alone_where_the_user_set_them_or_on_cuda(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert demo.step_threads(_args(), loader_workers=1) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert demo.step_threads(_args(device="cuda"), loader_workers=1) is None


def test_a_failed_step_still_prints_the_tables_of_what_finished(tmp_path, capsys):
    """The stock baseline finished (its held-out cases evaluated by nnU-Net's own console script), the next
    training fails: the baseline's Dice table, then the failure, and a non-zero exit."""
    raw = write_nnunet_raw_dataset(tmp_path / "raw", num_train=1, num_test=2, shape=(3, 32, 32))
    prediction = tmp_path / "predictions" / "stock"
    shutil.copytree(raw / "labelsTs", prediction)  # a perfect prediction: Dice 1
    logs = tmp_path / "logs"
    logs.mkdir()
    results = demo.DemoResults()
    demo._step("Evaluate stock", ["nnUNetv2_evaluate_simple", str(raw / "labelsTs"), str(prediction), "-l", "1", "2",
                                  "3", "-np", "1"], dict(os.environ), logs)
    results.summaries["nnU-Net 2D (stock)"] = json.loads((prediction / "summary.json").read_text())
    with pytest.raises(demo.StepFailed) as failed:
        demo._step("Train MedDINOv3 tiny", [sys.executable, "-c", "raise SystemExit(1)"], {}, logs)

    with pytest.raises(SystemExit) as exit_:
        demo._conclude(results, raw, tmp_path, _args(), failed.value)
    assert str(exit_.value.code) == str(failed.value)  # meddinov3's main prints it as the error, exit status 1
    out = capsys.readouterr().out
    table = out[out.index("Dice on held-out cases"):]
    assert "the runs that finished before the failure below" in table and "nnU-Net 2D (stock)" in table
    assert [line.split() for line in table.splitlines()[3:]] == [
        ["liver", "1.0000"], ["kidney", "1.0000"], ["spleen", "1.0000"], ["mean", "1.0000"]]
    assert "Linear probe" not in out  # it never ran
    written = json.loads((tmp_path / "demo_results.json").read_text())
    assert written["failed"] == str(failed.value) and list(written["dice"]) == ["nnU-Net 2D (stock)"]


def test_nothing_finished_prints_no_table(tmp_path, capsys):
    failure = demo.StepFailed("step 'Plan and preprocess' failed (exit 1); full log: x.log")
    with pytest.raises(SystemExit, match="Plan and preprocess"):
        demo._conclude(demo.DemoResults(), tmp_path, tmp_path, _args(), failure)
    assert "Dice" not in capsys.readouterr().out


def test_pretraining_resumes_only_where_there_is_a_checkpoint(tmp_path, caplog):
    """A first demo run starts pretraining without --resume (nothing to warn about); a rerun resumes."""
    from pretrain.configs import load_config
    from pretrain.engine import FINISHED, train

    raw = write_nnunet_raw_dataset(tmp_path / "raw", num_train=2, num_test=0, shape=(4, 64, 64))
    run_dir = tmp_path / "pretrain" / "tiny_stage1"
    assert demo.pretrain_resume_option(run_dir) == []
    config = load_config("tiny_stage1", [f"data.roots=[{raw}]", "train.iterations=1", "train.checkpoint_every=0"])
    with caplog.at_level("WARNING"):
        assert train(config, run_dir).status == FINISHED
    assert not [r for r in caplog.records if "resume" in r.getMessage()]
    assert demo.pretrain_resume_option(run_dir) == ["--resume"]  # its exit checkpoint
