"""``python -m pretrain distill``: a frozen teacher (any encoder the loader reads) teaches a smaller student with
Meta's multi-distillation step, through the pretraining engine, so that the engine's guarantees hold for it:
resume bit for bit (also after SIGTERM and kill -9), global-batch centring under accumulation, the monitors,
the leakage guard, export with the teacher's licence; bad teachers get a one-line message and exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_accumulation_centring import _assert_same_step, _step, data, split_batch  # noqa: F401 (data: a fixture)
from test_pretrain_crash_safety import _wait_for

from nnunet_meddinov3.checkpoints import CheckpointMetadata, write_checkpoint
from nnunet_meddinov3.checkpoints.format import read_checkpoint
from nnunet_meddinov3.network.configs import ENCODER_CONFIGS
from nnunet_meddinov3.network.encoder import DINOv3Encoder
from pretrain.cli import main
from pretrain.configs import load_config
from pretrain.engine import FINISHED, PAUSED, STOPPED_COLLAPSE, Trainer, train
from pretrain.engine.checkpoint import list_checkpoints, read_training_checkpoint
from pretrain.engine.distill import HEADS_RUN, distill
from pretrain.engine.distributed import init_distributed
from pretrain.engine.data import build_loader
from pretrain.engine.progress import read_metrics
from pretrain.engine.run_record import read_run_status
from pretrain.export import export_run
from pretrain.model import build_student_and_teacher

STRAIGHT = ["train.iterations=8", "train.checkpoint_every=2", "train.keep_last=2"]


def _args(data) -> list[str]:
    return [f"data.roots=[{data['root']}]", f"data.cache_dir={data['cache']}"]


@pytest.fixture(scope="module")
def teacher_run(data, tmp_path_factory):
    """A tiny_stage1 run (the tiny encoder, 64-dim, 4 blocks): a teacher whose checkpoint carries heads."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert train(load_config("tiny_stage1", [*_args(data), "train.iterations=2"]), run).status == FINISHED
    return run


def _config(data, teacher, *overrides):
    return load_config("tiny_distill", [*_args(data), f"distill.teacher={teacher}", *overrides])


@pytest.fixture(scope="module")
def straight(data, teacher_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    assert distill(_config(data, teacher_run, *STRAIGHT), run).status == FINISHED
    return run


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"


def test_distill_from_a_run_resumes_bit_exact_and_exports_the_student(data, teacher_run, straight, tmp_path):
    paused = distill(_config(data, teacher_run, *STRAIGHT, "train.max_iterations=4"), tmp_path / "run")
    assert paused.status == PAUSED and paused.iteration == 4
    assert distill(_config(data, teacher_run, *STRAIGHT), tmp_path / "run", resume=True).status == FINISHED
    a, b = read_training_checkpoint(straight), read_training_checkpoint(tmp_path / "run")
    _assert_same_weights(a, b)
    losses = [[m["total_loss"] for m in read_metrics(run)] for run in (straight, tmp_path / "run")]
    assert losses[0] == losses[1]
    assert not (straight / HEADS_RUN).exists()  # the run's checkpoint had heads

    # the student is half the tiny teacher; the engine's "teacher" slot is the student's EMA
    assert a["student"]["backbone.encoder.vit.cls_token"].shape[-1] == 32
    assert a["teacher"].keys() == a["student"].keys()
    assert a["stage_record"]["teacher"] == str(teacher_run)
    metrics = read_metrics(straight)[-1]
    for key in ("dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy", "teacher_sample_entropy", "feature_std"):
        assert key in metrics and metrics[key] == metrics[key]

    path, metadata = export_run(straight, output=tmp_path / "student.safetensors")
    assert (metadata.architecture["embed_dim"], metadata.architecture["depth"]) == (32, 2)
    assert metadata.source["distilled_from"]["encoder"] == "meddinov3_tiny"
    assert metadata.stages[-1]["stage"] == "distillation"
    assert read_checkpoint(path).metadata.licence == metadata.licence


def _released_teacher(data, path):
    """Meta's hub layout of a random tiny encoder: no heads, the DINOv3 License."""
    student, _ = build_student_and_teacher(load_config("tiny_stage1", _args(data)).model)
    torch.save({f"backbone.{k.removeprefix('vit.')}".replace("reg_token", "storage_tokens")
                .replace("rope.periods", "rope_embed.periods").replace(".gamma_1", ".ls1.gamma")
                .replace(".gamma_2", ".ls2.gamma"): v for k, v in student.encoder.state_dict().items()}, path)
    return student.encoder.state_dict()


def test_a_teacher_without_heads_gets_them_on_its_frozen_backbone_and_passes_on_its_licence(data, tmp_path):
    initial = _released_teacher(data, tmp_path / "released.pth")
    config = _config(data, tmp_path / "released.pth", "distill.teacher_encoder=meddinov3_tiny",
                     "train.iterations=2", "train.checkpoint_every=0")
    assert distill(config, tmp_path / "run").status == FINISHED
    heads = tmp_path / "run" / HEADS_RUN
    assert [m["backbone_lr_factor"] for m in read_metrics(heads)] == [0.0] * 4  # head_warmup.iterations
    warmed = read_training_checkpoint(heads)
    for key, value in initial.items():  # the teacher's backbone never moved
        assert torch.equal(warmed["student"][f"backbone.encoder.{key}"], value), key
    state = read_training_checkpoint(tmp_path / "run")
    assert state["config"]["distill"]["teacher_heads"] == str(list_checkpoints(heads)[-1][1].resolve())
    assert "DINOv3 License" in state["provenance"]["licence"]
    _, metadata = export_run(tmp_path / "run", output=tmp_path / "student.safetensors")
    assert "DINOv3 License" in metadata.licence
    # resuming a finished warm-up goes straight to the distillation
    assert distill(config, tmp_path / "run", resume=True).message.startswith("nothing to do")


def test_the_step_learns_from_the_frozen_teacher_and_centres_the_global_batch(data, teacher_run, tmp_path):
    def trainer(name, *overrides):
        t = Trainer(_config(data, teacher_run, "model.drop_path_rate=0.0", *overrides), tmp_path / name,
                    init_distributed())
        t.setup()
        return t

    whole = trainer("whole", "data.batch_size=8", "loss.koleo_group_size=2")
    frozen = {k: v.clone() for k, v in whole.distill_teacher.state_dict().items()}
    assert not any(p.requires_grad for p in whole.distill_teacher.parameters()) and not whole.distill_teacher.training
    seen = []
    forward = whole.student_forward
    whole.student_forward = lambda g, l, masks, idx: seen.append(masks) or forward(g, l, masks, idx)  # noqa: E731
    loader = build_loader(whole.config, whole.slices, 0, 1, 1, 5, 6, pin_memory=False, patch_size=16)
    batch = next(iter(loader))
    ema_before = {k: v.clone() for k, v in whole.teacher.state_dict().items()}
    reference = _step(whole, [batch])
    assert seen == [None]  # Meta's distillation: the student sees its global crops unmasked
    for key, value in whole.distill_teacher.state_dict().items():
        assert torch.equal(value, frozen[key]), key  # no EMA update of the teacher
    assert any(not torch.equal(v, ema_before[k]) for k, v in whole.teacher.state_dict().items())  # the student's EMA

    micro = trainer("micro", "data.batch_size=2", "optim.global_batch_size=8")
    assert micro.accumulation == 4
    step = _step(micro, split_batch(batch, 2))
    _assert_same_step(step, reference, ("dino_loss", "ibot_loss", "koleo_loss", "total_loss", "teacher_entropy"),
                      reference["metrics"]["lr"])


def _cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_teachers_and_students_get_one_line_and_exit_2(data, teacher_run, straight, tmp_path, capsys):
    common = ["--data", str(data["root"]), "--output", str(tmp_path / "out"), *_args(data)[1:]]
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    patch8 = ENCODER_CONFIGS["meddinov3_tiny"].replace(patch_size=8)
    encoder = DINOv3Encoder(patch8, in_channels=1)
    write_checkpoint(tmp_path / "patch8.safetensors", encoder.state_dict(),
                     CheckpointMetadata(architecture=patch8.to_dict(), in_channels=1))
    cases = [(["--teacher", str(tmp_path / "garbage.pth")], "cannot be read"),
             (["--teacher", str(tmp_path / "missing.pth")], "cannot be read"),
             (["--teacher", str(straight), "model.encoder=meddinov3_tiny"], "smaller than the student"),
             (["--teacher", str(tmp_path / "patch8.safetensors")], "patch size 8"),
             (["--teacher", str(teacher_run), "model.encoder=vit7b16"], "cannot load"),
             (["--teacher", str(teacher_run), "model.dino_head.prototypes=128"], "prototypes")]
    for extra, words in cases:
        code, err = _cli(capsys, "distill", "--config", "tiny_distill", *common, *extra)
        assert code == 2 and len(err) == 1 and err[0].startswith("error:") and words in err[0], (extra, err)
    code, err = _cli(capsys, "distill", "--config", "tiny_stage1", "--teacher", str(teacher_run), *common)
    assert code == 2 and "distillation config" in err[0]


def test_monitors_and_leakage_guard_hold_for_distillation(data, teacher_run, tmp_path):
    stopped = distill(_config(data, teacher_run, "monitor.min_feature_std=1e9", "monitor.patience=1",
                              "monitor.start_iteration=0"), tmp_path / "collapse")
    assert stopped.status == STOPPED_COLLAPSE and "feature" in stopped.message
    guarded = distill(_config(data, teacher_run, "train.iterations=1", "data.exclude_case_ids=[ct_0]",
                              f"data.cache_dir={tmp_path / 'cache'}"), tmp_path / "guarded")
    assert read_training_checkpoint(guarded.run_dir)["stage_record"]["excluded_volumes"] == 1


def test_chain_pretrains_a_teacher_then_distils_and_exports(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDDINOV3_CACHE", str(tmp_path / "cache_home"))
    code = main(["chain", "--configs", "tiny_stage1", "tiny_distill", "--data", str(data["root"]), "--output",
                 str(tmp_path / "chain"), "--export", "tiny_student", _args(data)[1], "1:train.iterations=2",
                 "2:train.iterations=2", "train.checkpoint_every=0"])
    assert code == 0, capsys.readouterr()
    state = read_training_checkpoint(tmp_path / "chain" / "02_tiny_distill")
    assert state["stage_record"]["teacher"] == str((tmp_path / "chain" / "01_tiny_stage1").resolve())
    assert state["student"]["backbone.encoder.vit.cls_token"].shape[-1] == 32
    assert (tmp_path / "cache_home" / "exports" / "tiny_student.safetensors").is_file()


def test_sigterm_and_kill_9_then_resume_is_bit_exact(data, teacher_run, straight, tmp_path):
    """The engine's crash safety (tests/pretrain/test_pretrain_crash_safety.py), for a distillation run."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "pretrain", "distill", "--config", "tiny_distill", "--teacher", str(teacher_run),
               "--data", str(data["root"]), "--output", str(run), "--resume", *_args(data)[1:], *STRAIGHT]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for signum in (signal.SIGTERM, signal.SIGKILL):  # each after a checkpoint newer than the run had
        newest = max((i for i, _ in list_checkpoints(run)), default=0)
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            _wait_for(process, lambda: max((i for i, _ in list_checkpoints(run)), default=0) > newest)
            process.send_signal(signum)
            process.communicate(timeout=60)  # reads its last words: a closed pipe would fail them
        if signum == signal.SIGTERM:  # a checkpoint at the current iteration, then "paused"
            assert process.returncode == 0 and read_run_status(run)["status"] == PAUSED
        else:
            assert process.returncode == -signal.SIGKILL
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "resuming" in final.stdout + final.stderr and read_run_status(run)["status"] == FINISHED
    _assert_same_weights(read_training_checkpoint(straight), read_training_checkpoint(run))
