"""``meddinov3 probe`` on a tiny synthetic dataset preprocessed by the real ``nnUNetv2_plan_and_preprocess``:
it ranks a checkpoint whose features separate the classes above a random init, deterministically, and
refuses bad input with a message."""

import json
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from e2e_helpers import planned_synthetic_dataset
from nnunet_meddinov3.checkpoints import CheckpointMetadata, write_checkpoint
from nnunet_meddinov3.cli.main import main
from nnunet_meddinov3.evaluation.probe import IGNORE, load_slices, preprocessed_split
from nnunet_meddinov3.network.encoder import build_encoder

DATASET = 503


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return planned_synthetic_dataset(tmp_path_factory.mktemp("probe"), DATASET, "ProbeCT",
                                     ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET), "-c", "2d", "-np", "1"],
                                     num_train=10, num_test=1, shape=(6, 64, 64))


@pytest.fixture
def nnunet_env(dataset, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "MEDDINOV3_CACHE"):
        monkeypatch.setenv(key, dataset["env"][key])
    return dataset


def class_separating_checkpoint(path, env):
    """A tiny encoder trained (supervised, a few steps) so that its last block separates the classes of
    fold 0's training slices, written in the project's format."""
    split = preprocessed_split(DATASET, "2d", "nnUNetPlans", 0)
    train = load_slices(split.folder, split.train, split.class_names)
    torch.manual_seed(0)
    encoder = build_encoder("meddinov3_tiny", in_channels=1, layer_scale_init=1.0)
    head = torch.nn.Conv2d(encoder.embed_dim, 4, 1)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)
    for step in range(150):
        index = torch.arange(step * 8, step * 8 + 8) % train.images.shape[0]
        features = encoder.intermediate_features(train.images[index], [encoder.depth - 1])[0]
        logits = F.interpolate(head(features), size=train.labels.shape[-2:], mode="bilinear")
        loss = F.cross_entropy(logits, train.labels[index], ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    write_checkpoint(path, encoder.state_dict(),
                     CheckpointMetadata(architecture=encoder.config.to_dict(), in_channels=1))
    return path


def probe(dataset, *args):
    return subprocess.run(["meddinov3", "probe", "-d", str(DATASET), *args], env=dataset["env"], cwd=dataset["root"],
                          capture_output=True, text=True)


def test_probe_ranks_a_class_separating_checkpoint_above_random_init(nnunet_env, tmp_path):
    trained = class_separating_checkpoint(tmp_path / "separating.safetensors", nnunet_env["env"])
    runs = []
    for name in ("a", "b"):
        proc = probe(nnunet_env, "--weights", "random:meddinov3_tiny,layer_scale_init=1.0", str(trained), "--steps", "100",
                     "-o", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Linear probe Dice, fold 0 validation" in proc.stdout and "liver" in proc.stdout
        runs.append(json.loads((tmp_path / name / "probe.json").read_text()))
    first, second = runs
    assert first["results"] == second["results"]  # deterministic for a seed
    dice = {source: r["dice"]["mean"] for source, r in first["results"].items()}
    # against a random init of the same architecture and LayerScale init as the trained one
    assert dice[str(trained)] > dice["random:meddinov3_tiny,layer_scale_init=1.0"] + 0.05, dice
    assert first["validation_cases"] and set(first["validation_cases"]).isdisjoint(first["train_cases"])
    assert first["results"][str(trained)]["layers"] == [0, 1, 2, 3]
    assert (tmp_path / "a" / "probe.png").stat().st_size > 5000

    # the k-NN variant trains nothing and ranks the same way
    proc = probe(nnunet_env, "--weights", "random:meddinov3_tiny,layer_scale_init=1.0", str(trained), "--method", "knn",
                 "-o", str(tmp_path / "knn"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "k-NN probe Dice (k = 20), fold 0 validation" in proc.stdout
    record = json.loads((tmp_path / "knn" / "probe.json").read_text())
    assert record["method"] == "knn" and record["k"] == 20 and "steps" not in record
    knn = {source: r["dice"]["mean"] for source, r in record["results"].items()}
    assert knn[str(trained)] > knn["random:meddinov3_tiny,layer_scale_init=1.0"] + 0.05, knn


def test_probe_takes_a_pretraining_run_folder(nnunet_env, tmp_path):
    """A run folder is probed through its EMA teacher (the weights an export would hold)."""
    from pretrain.configs import load_config
    from pretrain.engine import train

    raw = nnunet_env["root"] / "raw" / f"Dataset{DATASET}_ProbeCT"
    config = load_config("tiny_stage1", [f"data.roots=[{raw}]", f"data.exclude_test_images_of=[{raw}]",
                                         "train.iterations=2", "train.checkpoint_every=0"])
    assert train(config, tmp_path / "run").ok
    assert main(["probe", "-d", str(DATASET), "--weights", str(tmp_path / "run"), "--steps", "5", "--layers", "3",
                 "-o", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert "EMA teacher" in record["results"][str(tmp_path / "run")]["weights"]


@pytest.mark.parametrize("arguments, words", [
    (["--weights", "no_such_weights"], ["'no_such_weights' is neither an existing file nor a registered"]),
    (["--weights", "random:vitz16"], ["unknown encoder 'vitz16'", "meddinov3_tiny"]),
    (["--weights", "random:meddinov3_tiny,layerscale=1"], ["unknown encoder option(s) ['layerscale']"]),
    (["--weights", "random:meddinov3_tiny", "--layers", "1", "4"], ["layers [4] are out of range", "0-3"]),
    (["--weights", "random:meddinov3_tiny", "-f", "7"], ["fold 7 does not exist"]),
    (["--weights", "random:meddinov3_tiny", "--method", "knn", "--k", "0"], ["k must be at least 1"]),
    (["--weights", "empty run"], ["is neither a pretraining run folder with checkpoints"]),
    (["--weights", "random:meddinov3_tiny", "-p", "nnUNetPlansOther"], ["no plans 'nnUNetPlansOther'",
                                                                       "nnUNetv2_plan_and_preprocess"]),
])
def test_probe_refuses_bad_input_with_a_message(nnunet_env, tmp_path, capsys, arguments, words):
    (tmp_path / "empty run").mkdir()
    arguments = [str(tmp_path / a) if a == "empty run" else a for a in arguments]
    assert main(["probe", "-d", str(DATASET), *arguments, "--steps", "2", "-o", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("meddinov3 probe: error:") and "Traceback" not in error
    for word in words:
        assert word in error


def test_probe_refuses_a_dataset_without_labels_or_preprocessing(nnunet_env, tmp_path, monkeypatch, capsys):
    assert main(["probe", "-d", "Dataset999_Nothing", "--weights", "random:meddinov3_tiny"]) == 1
    assert "Dataset999_Nothing is not preprocessed" in capsys.readouterr().err
    assert main(["probe", "-d", "999", "--weights", "random:meddinov3_tiny"]) == 1
    assert "dataset '999' not found" in capsys.readouterr().err

    copy = tmp_path / "pre"
    shutil.copytree(nnunet_env["root"] / "pre", copy)
    dataset_json = copy / f"Dataset{DATASET}_ProbeCT" / "dataset.json"
    meta = json.loads(dataset_json.read_text())
    dataset_json.write_text(json.dumps(dict(meta, labels={"background": 0})))
    monkeypatch.setenv("nnUNet_preprocessed", str(copy))
    assert main(["probe", "-d", str(DATASET), "--weights", "random:meddinov3_tiny"]) == 1
    assert "names no foreground label" in capsys.readouterr().err

    monkeypatch.delenv("nnUNet_preprocessed")
    assert main(["probe", "-d", str(DATASET), "--weights", "random:meddinov3_tiny"]) == 1
    assert "nnUNet_preprocessed is not set" in capsys.readouterr().err


def test_pretraining_logs_probe_curves_and_refuses_a_probe_on_its_own_images(nnunet_env, tmp_path):
    from pretrain.configs import ConfigError, load_config
    from pretrain.engine import train
    from pretrain.engine.progress import read_metrics

    raw = nnunet_env["root"] / "raw" / f"Dataset{DATASET}_ProbeCT"
    validation = preprocessed_split(DATASET, "2d", "nnUNetPlans", 0).val
    run = [f"data.roots=[{raw}]", f"data.exclude_test_images_of=[{raw}]", f"data.cache_dir={tmp_path / 'cache'}",
           "train.iterations=4", "train.checkpoint_every=0", f"eval.dataset={DATASET}", "eval.every=2",
           "eval.steps=5"]
    with pytest.raises(ConfigError) as error:  # fold 0's validation cases are among the pretraining images
        train(load_config("tiny_stage1", run), tmp_path / "leaky")
    assert "are in the pretraining data" in str(error.value) and validation[0] in str(error.value)
    assert "data.exclude_case_ids=" in str(error.value)

    guarded = load_config("tiny_stage1", [*run, f"data.exclude_case_ids=[{', '.join(validation)}]"])
    assert train(guarded, tmp_path / "guarded").ok
    probed = {m["iteration"]: m for m in read_metrics(tmp_path / "guarded") if "probe_dice" in m}
    assert sorted(probed) == [2, 4]
    assert 0 <= probed[4]["probe_dice"] <= 1 and "probe_dice_liver" in probed[4]


def test_distillation_logs_probe_curves_of_the_student_and_refuses_leaks(nnunet_env, tmp_path):
    """`pretrain distill` (pretrain/engine/distill.py): the same probe curves (of the student's EMA) and leak check."""
    from pretrain.configs import ConfigError, load_config
    from pretrain.engine import train
    from pretrain.engine.distill import distill
    from pretrain.engine.progress import read_metrics

    raw = nnunet_env["root"] / "raw" / f"Dataset{DATASET}_ProbeCT"
    guard = f"data.exclude_case_ids=[{', '.join(preprocessed_split(DATASET, '2d', 'nnUNetPlans', 0).val)}]"
    run = [f"data.roots=[{raw}]", f"data.exclude_test_images_of=[{raw}]", f"data.cache_dir={tmp_path / 'cache'}",
           "train.checkpoint_every=0", "eval.every=2", "eval.steps=5", f"distill.teacher={tmp_path / 'teacher'}"]
    assert train(load_config("tiny_stage1", [*run, guard, "train.iterations=1"]), tmp_path / "teacher").ok
    with pytest.raises(ConfigError, match="are in the pretraining data"):
        distill(load_config("tiny_distill", [*run, f"eval.dataset={DATASET}"]), tmp_path / "leaky")
    assert distill(load_config("tiny_distill", [*run, guard, f"eval.dataset={DATASET}", "train.iterations=4"]),
                   tmp_path / "student").ok
    probed = {m["iteration"]: m for m in read_metrics(tmp_path / "student") if "probe_dice" in m}
    assert sorted(probed) == [2, 4] and 0 <= probed[4]["probe_dice"] <= 1
