"""The training loop in one process on a tiny ViT and synthetic CT: learning, exact resume, guards,
and the head warm-up of continued pretraining."""

import json
import math

import pytest
import torch
from pretrain_synthetic import ct_volume, texture_volume, write_nifti

from pretrain.configs import load_config
from pretrain.engine import FINISHED, PAUSED, STOPPED_COLLAPSE, STOPPED_NONFINITE, train
from pretrain.engine.checkpoint import list_checkpoints, read_training_checkpoint
from pretrain.engine.progress import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four synthetic CT volumes (24 body slices) and a slice cache shared by the module's runs."""
    root = tmp_path_factory.mktemp("volumes")
    for i in range(4):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(10 + i))
    return [f"data.roots=[{root}]", f"data.cache_dir={tmp_path_factory.mktemp('slice_cache')}"]


def tiny(data, *overrides, name="tiny_stage1"):
    return load_config(name, [*data, *overrides])


def test_losses_fall_over_30_iterations(data, tmp_path):
    result = train(tiny(data, "train.iterations=30", "train.checkpoint_every=0"), tmp_path / "run")
    assert result.status == FINISHED and result.iteration == 30
    metrics = read_metrics(tmp_path / "run")
    assert [m["iteration"] for m in metrics] == list(range(1, 31))
    assert all(m["finite"] for m in metrics)

    def mean(key, part):
        return sum(m[key] for m in part) / len(part)

    # over 30 iterations the losses only have to stay finite and bounded; that the DINO loss leaves
    # ln K is test_tiny_recipe_learns_on_textures below (a few hundred iterations)
    assert all(m["dino_loss"] < math.log(256) + 0.1 for m in metrics)
    for key in ("lr", "momentum", "teacher_temp", "images_per_s", "memory_gib", "feature_std", "teacher_entropy"):
        assert key in metrics[-1]
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    assert [i for i, _ in list_checkpoints(tmp_path / "run")] == [30]  # the exit checkpoint


def test_tiny_recipe_learns_on_textures(tmp_path):
    """Self-distillation learns, not only KoLeo: on slices whose volumes each have a texture of their own,
    the tiny recipe's DINO loss leaves ln K and the teacher's targets sharpen, its head keeping the logit
    spread of its initialisation (~0.02; a collapsing run flattens it below 0.005)."""
    root = tmp_path / "textures"
    for i in range(8):
        write_nifti(root / f"tex_{i}.nii.gz", texture_volume(i))
    config = load_config("tiny_stage1", [f"data.roots=[{root}]", f"data.cache_dir={tmp_path / 'cache'}",
                                         "data.body_threshold=null", "train.iterations=400", "train.checkpoint_every=0",
                                         "augment.window_p=0"])
    result = train(config, tmp_path / "run")
    assert result.status == FINISHED, result.message
    last = read_metrics(tmp_path / "run")[-50:]

    def mean(key):
        return sum(m[key] for m in last) / len(last)

    assert mean("dino_loss") < math.log(256) - 0.03, mean("dino_loss")
    assert mean("teacher_sample_entropy") < 0.98 and mean("teacher_logit_std") > 0.01


def test_tiny_recipe_learns_on_the_demo_phantoms(tmp_path):
    """The demo's own data and intensities: its 16 training volumes (``meddinov3 demo``'s generator and
    seed) less fold 0's validation cases, normalised as nnU-Net's CTNormalization does (foreground
    percentiles 0.5/99.5, mean, std). In 500 iterations the DINO loss leaves ln K and the head's logit
    spread grows, and the default monitors let the run finish. Measured with the demo's nnU-Net plans
    (seed 0, 43 CPU s on one thread): DINO 5.298 in the last 100 iterations (ln K = 5.545), logit
    spread 0.015 -> 0.061. The batch-4 recipe before it stayed at ln K on other data (the thorax of
    pretrain/README.md, "Does it learn?")."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset

    raw = write_nnunet_raw_dataset(tmp_path / "raw", num_train=16, num_test=6, shape=(12, 96, 96))
    foreground = np.concatenate([
        sitk.GetArrayFromImage(sitk.ReadImage(str(image)))[
            sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / image.name.replace("_0000", "")))) > 0]
        for image in sorted((raw / "imagesTr").glob("*.nii.gz"))]).astype(np.float64)
    low, high = np.percentile(foreground, [0.5, 99.5])
    config = load_config("tiny_stage1", [
        f"data.roots=[{raw}]", f"data.cache_dir={tmp_path / 'cache'}", f"data.exclude_test_images_of=[{raw}]",
        "data.exclude_case_ids=[case_000, case_007, case_008, case_011]",
        f"data.intensity.window=[{low}, {high}]", f"data.intensity.mean={foreground.mean()}",
        f"data.intensity.std={foreground.std()}", "train.iterations=500", "train.checkpoint_every=0"])
    result = train(config, tmp_path / "run")
    assert result.status == FINISHED, result.message
    metrics = read_metrics(tmp_path / "run")

    def mean(key, part):
        return sum(m[key] for m in part) / len(part)

    first, last = metrics[:100], metrics[-100:]
    assert mean("dino_loss", last) < math.log(256) - 0.1, mean("dino_loss", last)
    assert mean("teacher_logit_std", last) > 1.5 * mean("teacher_logit_std", first)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(data, tmp_path):
    run = ["train.iterations=8", "train.checkpoint_every=2", "train.keep_last=2"]
    assert train(tiny(data, *run), tmp_path / "straight").status == FINISHED

    paused = train(tiny(data, *run, "train.max_iterations=4"), tmp_path / "resumed")
    assert paused.status == PAUSED and paused.iteration == 4
    assert paused.checkpoint.name == "checkpoint_00000004.pt"
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(data, *run), tmp_path / "resumed")
    resumed = train(tiny(data, *run), tmp_path / "resumed", resume=True)
    assert resumed.status == FINISHED and resumed.iteration == 8

    a = read_training_checkpoint(tmp_path / "straight")
    b = read_training_checkpoint(tmp_path / "resumed")
    for part in ("teacher", "student"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"]), key
    # the metrics log of the resumed run reads like the uninterrupted one
    straight, again = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["iteration"] for m in again] == list(range(1, 9))
    assert [m["total_loss"] for m in again] == [m["total_loss"] for m in straight]
    assert [i for i, _ in list_checkpoints(tmp_path / "resumed")] == [6, 8]  # keep_last=2


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    config = tiny(data, "train.iterations=10", "train.checkpoint_every=2", "debug.inject_nan_at_iteration=3")
    result = train(config, tmp_path / "run")
    assert result.status == STOPPED_NONFINITE and result.iteration == 6  # iterations 4, 5, 6 (1-based)
    assert "not finite for 3 consecutive iterations" in result.message
    assert "checkpoint_00000002.pt" in result.message
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == STOPPED_NONFINITE and status["checkpoint"].endswith("checkpoint_00000002.pt")
    # no checkpoint was written after the last good one (4 would have been due), and it loads
    assert [i for i, _ in list_checkpoints(tmp_path / "run")] == [2]
    good = read_training_checkpoint(tmp_path / "run")
    assert good["iteration"] == 2 and all(torch.isfinite(v).all() for v in good["teacher"].values())
    logged = read_metrics(tmp_path / "run")
    assert [m["finite"] for m in logged] == [True, True, True, False, False, False]


def test_a_single_nan_is_skipped_and_the_run_goes_on(data, tmp_path):
    config = tiny(data, "train.iterations=4", "train.checkpoint_every=0", "debug.inject_nan_at_iteration=1",
                  "debug.inject_nan_iterations=1")
    result = train(config, tmp_path / "run")
    assert result.status == FINISHED
    assert [m["finite"] for m in read_metrics(tmp_path / "run")] == [True, False, True, True]
    assert all(torch.isfinite(v).all() for v in read_training_checkpoint(tmp_path / "run")["student"].values())


def test_collapse_monitor_stops_the_run(data, tmp_path):
    config = tiny(data, "train.iterations=10", "monitor.max_koleo=-1000", "monitor.patience=2",
                  "monitor.start_iteration=1")
    result = train(config, tmp_path / "run")
    assert result.status == STOPPED_COLLAPSE and result.iteration == 3
    assert "koleo_loss" in result.message and "collapse" in result.message


def test_default_monitor_stops_a_uniform_collapse(data, tmp_path):
    """A teacher softer than the student (0.2 vs 0.1) never sharpens: the heads flatten, the targets
    are uniform, the DINO loss sits at ln K. The default monitor (patience and flatness threshold set
    for a 60-iteration run) stops the run instead of reporting it done, and its message names the
    monitor and what to try."""
    config = tiny(data, "train.iterations=60", "train.checkpoint_every=10", "loss.teacher_temp_start=0.2",
                  "loss.teacher_temp_end=0.2", "monitor.patience=10", "monitor.max_teacher_logit_std=0.018")
    result = train(config, tmp_path / "run")
    assert result.status == STOPPED_COLLAPSE and result.iteration < 60
    assert "uniform collapse" in result.message and "teacher_sample_entropy" in result.message
    assert "optim.warmup_iterations" in result.message
    # nothing is lost: the stop writes a checkpoint of the iteration it stopped at
    assert result.checkpoint.name == f"checkpoint_{result.iteration:08d}.pt" and result.checkpoint.is_file()
    assert str(result.checkpoint) in result.message and "--resume" in result.message
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == STOPPED_COLLAPSE
    last = read_metrics(tmp_path / "run")[-1]
    assert last["teacher_sample_entropy"] > 0.98 and abs(last["dino_loss"] - math.log(256)) < 0.01 * math.log(256)


def test_head_warmup_freezes_released_backbone_then_warms_it_up(data, tmp_path):
    """Stage 0: weights without heads -> heads train on a frozen backbone, then the backbone LR warms up."""
    released = tmp_path / "released.pth"
    from pretrain.model import build_student_and_teacher

    student, _ = build_student_and_teacher(tiny(data).model)
    torch.save({f"backbone.{k.removeprefix('vit.')}".replace("reg_token", "storage_tokens")
                .replace("rope.periods", "rope_embed.periods").replace(".gamma_1", ".ls1.gamma")
                .replace(".gamma_2", ".ls2.gamma"): v for k, v in student.encoder.state_dict().items()}, released)
    config = tiny(data, f"init.weights={released}", "train.iterations=4", "train.checkpoint_every=2",
                  "head_warmup.iterations=2", "head_warmup.backbone_warmup_iterations=2")
    assert train(config, tmp_path / "run").status == FINISHED
    factors = [m["backbone_lr_factor"] for m in read_metrics(tmp_path / "run")]
    assert factors == [0.0, 0.0, 0.5, 1.0]

    at_2 = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_00000002.pt", weights_only=True)
    at_4 = read_training_checkpoint(tmp_path / "run")
    initial = student.encoder.state_dict()
    for key, value in initial.items():  # frozen backbone: unchanged after the head-only iterations
        assert torch.equal(at_2["student"][f"backbone.encoder.{key}"], value), key
    assert not torch.equal(at_4["student"]["backbone.encoder.vit.blocks.0.attn.qkv.weight"],
                           initial["vit.blocks.0.attn.qkv.weight"])
    head_weight = next(k for k in at_2["student"] if k.startswith("dino_head.mlp") and k.endswith("weight"))
    assert not torch.equal(at_2["student"][head_weight], at_4["student"][head_weight])  # the heads train
    assert at_4["provenance"]["init"]["kind"] == "weights" and "DINOv3 License" in at_4["provenance"]["licence"]


def test_losses_are_computed_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the DINO einsum / KoLeo and Gram matmuls must not drop to bf16 (an H100
    run logged the DINO loss quantised to 11.125 before the losses were taken out of autocast)."""
    from pretrain.engine.objective import build_losses, compute_losses
    from pretrain.engine.teacher_targets import TeacherPass, centred_targets
    from pretrain.optim import Schedules

    config = load_config("tiny_stage2_gram", ["model.dino_head.prototypes=4096", "model.ibot_head.prototypes=4096"])
    g = torch.Generator().manual_seed(0)
    b, k, d, p = 4, 4096, 64, 16
    masks = torch.zeros(2 * b, p, dtype=torch.bool)
    masks[:b, :5] = True
    m = int(masks.sum())

    def logits(n):  # head outputs are small: unit-norm bottleneck times prototypes of norm ~0.3
        return 0.3 * torch.randn(n, k, generator=g)

    student = {"cls": torch.randn(2 * b, d, generator=g), "patch": torch.randn(2 * b, p, d, generator=g),
               "dino_global": logits(2 * b), "dino_local": logits(4 * b), "ibot_masked": logits(m)}
    teacher = {"dino_global": logits(2 * b), "ibot_masked": logits(m)}
    gram_target = torch.randn(2 * b, p, d, generator=g)
    sched = Schedules(config, b).at(3)
    weights = masks.float().sum(-1, keepdim=True).clamp(min=1).reciprocal().expand_as(masks)[masks]

    def run():
        losses = build_losses(config)
        passes = [TeacherPass(None, teacher["dino_global"], teacher["ibot_masked"])]
        targets = centred_targets(passes, sched["teacher_temp"], config.loss.sinkhorn_iterations)[0]
        return compute_losses(losses, config, sched, student, targets, gram_target, masks, weights)

    reference_total, reference = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = run()
        assert torch.einsum("ij,ij->i", student["cls"], student["cls"]).dtype == torch.bfloat16  # autocast is on
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, reference_total, rtol=1e-6, atol=1e-6)
    for key, value in reference.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-6, atol=1e-6)


def test_loss_plot_drawn_once_per_occasion_and_resume_names_changed_settings(data, tmp_path, monkeypatch, caplog):
    from pretrain.engine.progress import ProgressReporter

    drawn = []
    plot = ProgressReporter.plot
    monkeypatch.setattr(ProgressReporter, "plot", lambda self: drawn.append(1) or plot(self))
    run = ["train.iterations=4", "train.checkpoint_every=1"]
    assert train(tiny(data, *run, "train.max_iterations=3"), tmp_path / "run").status == PAUSED
    assert len(drawn) == 3  # after the checkpoints of iterations 1 and 2, and once at the end (also a checkpoint)
    assert (tmp_path / "run" / "loss_curves.png").is_file()

    drawn.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="pretrain.engine.loop"):
        resumed = train(tiny(data, *run, "optim.lr=0.5", "data.num_workers=1"), tmp_path / "run", resume=True)
    assert resumed.status == FINISHED
    assert len(drawn) == 1
    warning = next(r.getMessage() for r in caplog.records if "differs from the checkpoint" in r.getMessage())
    assert "optim.lr" in warning and "train.max_iterations" not in warning and "data.num_workers" not in warning


def test_a_koleo_group_that_splits_a_batch_stops_before_training(data, tmp_path):
    from pretrain.configs import ConfigError

    with pytest.raises(ConfigError, match=r"loss.koleo_group_size: .*divide the per-rank batch 8"):
        train(tiny(data, "train.iterations=2", "loss.koleo_group_size=3"), tmp_path / "run")
    assert not list_checkpoints(tmp_path / "run")  # nothing written, nothing lost
