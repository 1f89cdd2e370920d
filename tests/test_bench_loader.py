"""``meddinov3 bench_loader``: nnU-Net's own training pipeline, timed on a tiny synthetic dataset planned by
``meddinov3 plan_and_preprocess``. No timing assertions: what is checked is that the pipeline measured is
the one nnUNetv2_train builds (its transforms, batch and crop), that the worker pool really ran, and
that bad input gets one message."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from e2e_helpers import planned_synthetic_dataset

DATASET = 994


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    planned = planned_synthetic_dataset(tmp_path_factory.mktemp("loader"), DATASET, "LoaderCT",
                                        ["meddinov3", "plan_and_preprocess", "-d", str(DATASET), "--vit", "tiny",
                                         "--target-patch", "128", "-np", "1"],
                                        num_train=6, num_test=0, shape=(6, 64, 64))
    return {**planned, "folder": planned["root"] / "pre" / f"Dataset{DATASET}_LoaderCT"}


@pytest.fixture
def nnunet_env(dataset, monkeypatch):
    from nnunet_meddinov3.cli.env import ext_trainer_value

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, dataset["env"][key])
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(None))  # as `meddinov3 env --export`
    return dataset


def test_console_script_times_nnunets_pipeline_and_its_worker_pool(dataset, tmp_path):
    out = tmp_path / "nested" / "loader.json"
    result = subprocess.run(["meddinov3", "bench_loader", "-d", str(DATASET), "--batches", "2", "--workers", "2",
                             "--gpu-images-per-s", "1e9", "-o", str(out)],
                            env=dataset["env"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    plans = json.loads((dataset["folder"] / "nnUNetPlansMedDINOv3.json").read_text())["configurations"]["2d_highres"]
    # the batch and patch of the plans, and crops enlarged for nnU-Net's 2D rotation before SpatialTransform
    assert record["batch_size"] == plans["batch_size"]
    assert record["patch_size"] == plans["patch_size"] == [128, 128]
    assert all(c > p for c, p in zip(record["crop_size"], record["patch_size"]))
    assert record["images_one_worker"] == 2 * plans["batch_size"]
    stages = [name for name, _ in record["stages_ms"]]
    assert stages[0] == "loading and cropping"
    # nnU-Net's 2D training transforms, in its order, with the probabilities of the randomly applied ones
    assert "SpatialTransform" in stages and stages.index("SpatialTransform") < stages.index("MirrorTransform")
    assert "GaussianNoiseTransform (p=0.1)" in stages and "GaussianBlurTransform (p=0.2)" in stages
    assert all(ms >= 0 for _, ms in record["stages_ms"])
    assert record["workers"] == 2 and record["images_per_s_workers"] > 0
    assert record["images_workers"] >= 4 * plans["batch_size"]  # max(--batches, 2 x workers) batches at least
    assert record["workers_needed"] == math.ceil(1e9 / record["images_per_s_one_worker"])
    assert "NOT enough" in result.stdout and "SpatialTransform" in result.stdout
    assert record["command"].startswith("meddinov3 bench_loader -d")
    # the trainer's log went to a temporary folder: nothing was written into nnUNet_results
    assert not (dataset["root"] / "res").exists()


def test_in_process_measurement_leaves_no_workers_threads_or_settings_behind(nnunet_env, monkeypatch):
    import multiprocessing

    import torch

    from nnunet_meddinov3.benchmark import loader

    monkeypatch.setattr(loader, "MIN_POOL_SECONDS", 0.2)
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    pipelines = []
    original = loader._one_worker

    def keep_pipeline(*args, **kwargs):  # the loader's transform list, before and after the timing
        built, dl, *rest = original(*args, **kwargs)
        pipelines.append(dl.transforms.transforms)
        return (built, dl, *rest)

    monkeypatch.setattr(loader, "_one_worker", keep_pipeline)
    threads = torch.get_num_threads()
    environment = dict(os.environ)
    result = loader.measure_loader(f"Dataset{DATASET}_LoaderCT", "2d", batches=1, workers=1)
    assert result.workers == 1 and result.images_per_s_workers > 0
    assert result.configuration == "2d" and result.images_one_worker == result.batch_size
    assert multiprocessing.active_children() == []  # nnU-Net's train and validation workers were shut down
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == environment  # nnUNet_n_proc_DA and nnUNet_results were restored
    assert not any(type(t).__name__ == "_TimedTransform" for t in pipelines[0])  # the timers were taken out
    assert result.workers_needed(0.5 * result.images_per_s_one_worker) == 1
    assert result.workers_needed(2.5 * result.images_per_s_one_worker) == 3


def test_a_dataset_known_only_by_name_is_not_preprocessed(nnunet_env):
    from nnunet_meddinov3.benchmark.loader import LoaderBenchError, measure_loader

    (nnunet_env["root"] / "raw" / "Dataset995_OnlyRaw").mkdir()
    with pytest.raises(LoaderBenchError, match="Dataset995_OnlyRaw is not preprocessed"):
        measure_loader("Dataset995_OnlyRaw", "2d")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from nnunet_meddinov3.cli.main import main

    code = main(["bench_loader", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("argv, expected", [
    (["-d", "993"], ["dataset '993' not found", f"Dataset{DATASET}_LoaderCT"]),
    (["-d", "Liver"], ["neither a dataset id", f"Dataset{DATASET}_LoaderCT"]),
    (["-d", str(DATASET), "-p", "nnUNetPlans"], ["no plans 'nnUNetPlans'", "nnUNetPlansMedDINOv3", "-p"]),
    (["-d", str(DATASET), "-c", "3d_lowres"], ["no configuration '3d_lowres'", "2d, 2d_highres, 3d_fullres"]),
    # our plans hold 3d_fullres since the 3D trainers; this dataset preprocessed 2d only
    (["-d", str(DATASET), "-c", "3d_fullres"], ["planned but not preprocessed", "nnUNetv2_preprocess"]),
    (["-d", str(DATASET), "-tr", "nnUNetTrainerMedDINOv4"], ["no trainer class 'nnUNetTrainerMedDINOv4'"]),
    (["-d", str(DATASET), "--gpu-images-per-s", "0"], ["must be positive"]),
    (["-d", str(DATASET), "--batches", "0"], ["--batches must be at least 1"]),
    (["-d", str(DATASET), "--workers", "-1", "--batches", "1"], ["--workers must be 0 or more"]),
])
def test_bad_input_gets_one_message(nnunet_env, capsys, argv, expected):
    code, text = _run(argv, capsys)
    assert code == 2
    assert "Traceback" not in text
    for words in expected:
        assert words in text


def test_a_planned_but_not_preprocessed_configuration_says_what_to_run(nnunet_env, capsys):
    folder = nnunet_env["folder"]
    plans = json.loads((folder / "nnUNetPlansMedDINOv3.json").read_text())
    plans["configurations"]["2d_copy"] = {**plans["configurations"]["2d"], "data_identifier": "not_preprocessed"}
    (folder / "PlansNotPreprocessed.json").write_text(json.dumps(plans))
    try:
        code, text = _run(["-d", str(DATASET), "-p", "PlansNotPreprocessed", "-c", "2d_copy"], capsys)
    finally:
        (folder / "PlansNotPreprocessed.json").unlink()
    assert code == 2
    assert "planned but not preprocessed" in text and "nnUNetv2_preprocess" in text


def test_unset_preprocessed_folder_is_named(nnunet_env, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed")
    code, text = _run(["-d", str(DATASET)], capsys)
    assert code == 2 and "nnUNet_preprocessed not set" in text
