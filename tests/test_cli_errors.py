"""User-facing failure paths of ``meddinov3 predict | compare | features | weights``.

Each case calls the console script's entry point in-process (``main(argv)``), checks the exit code and the
message (what is wrong / what to do), and that no Python traceback reaches the user. No network is built and
nothing is trained: every check fires before a predictor or encoder is constructed, on skeleton nnU-Net folders.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_meddinov3.cli.main import main

DATASET = "Dataset502_X"
TRAINER = "nnUNetTrainerMedDINOv3"
PLANS = "nnUNetPlans"
MODEL = f"{TRAINER}__{PLANS}__2d"


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code (also from argparse's SystemExit) and stdout + stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse rejects bad option values this way
        code = e.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output, output
    return code, output


# ------------------------------------------------------------------------------------------------------ predict

@pytest.fixture()
def nnunet_env(tmp_path, monkeypatch):
    """nnUNet_raw/_preprocessed/_results in tmp_path, with a skeleton trained model (fold 0 only)."""
    folders = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    # `meddinov3 predict` writes nnUNet_extTrainer into os.environ; monkeypatch restores the original at teardown.
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    model = folders["nnUNet_results"] / DATASET / MODEL
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                    "numTraining": 2, "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps({"dataset_name": DATASET, "plans_name": PLANS}))
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")  # never opened by the checks below
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), dtype=np.float32)), str(images / "case_0000.nii.gz"))
    return {"model": model, "images": images, "out": tmp_path / "out", "tmp": tmp_path}


def predict(capsys, env, *extra, dataset="502", trainer=TRAINER, images=None):
    return run_cli(capsys, "predict", "-i", images or env["images"], "-o", env["out"], "-d", dataset, "-c", "2d",
                   "-tr", trainer, "-device", "cpu", *extra)


def test_predict_input_folder_not_found(capsys, nnunet_env):
    missing = nnunet_env["tmp"] / "no_such_folder"
    code, out = predict(capsys, nnunet_env, images=missing)
    assert code == 2
    assert f"input folder not found: {missing}" in out


def test_predict_keep_staged_not_empty(capsys, nnunet_env):
    staged = nnunet_env["tmp"] / "staged"
    (staged / "imagesTs").mkdir(parents=True)
    (staged / "imagesTs" / "case_00000_0000.nii.gz").write_bytes(b"old")
    code, out = predict(capsys, nnunet_env, "--keep-staged", staged)
    assert code == 2
    assert "--keep-staged" in out and "is not empty; give a new folder" in out
    assert (staged / "imagesTs" / "case_00000_0000.nii.gz").read_bytes() == b"old"


def test_predict_keep_staged_must_be_a_new_or_empty_folder(capsys, nnunet_env):
    afile = nnunet_env["tmp"] / "afile"
    afile.write_text("x")
    code, out = predict(capsys, nnunet_env, "--keep-staged", afile)
    assert code == 2 and "is a file; give a new folder" in out
    staged = nnunet_env["tmp"] / "staged"
    staged.mkdir()
    (staged / "cases.json").write_text("precious")
    code, out = predict(capsys, nnunet_env, "--keep-staged", staged)
    assert code == 2 and "is not empty; give a new folder" in out
    assert (staged / "cases.json").read_text() == "precious"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"channel_names": {"0": "CT"}})])
def test_predict_broken_dataset_json(capsys, nnunet_env, content):
    (nnunet_env["model"] / "dataset.json").write_text(content)
    code, out = predict(capsys, nnunet_env, "-npp", "0", "-nps", "0")
    assert code == 2 and "is not an nnU-Net dataset.json with a file_ending" in out


@pytest.mark.parametrize("broken", ["no plans.json", "empty checkpoint"])
def test_predict_unloadable_model(capsys, nnunet_env, broken):
    if broken == "no plans.json":
        (nnunet_env["model"] / "plans.json").unlink()
    code, out = predict(capsys, nnunet_env, "-npp", "0", "-nps", "0")
    assert code == 2 and "cannot load the model in" in out and "finished nnUNetv2_train output" in out


def test_predict_unknown_dataset_id(capsys, nnunet_env):
    code, out = predict(capsys, nnunet_env, dataset="999")
    assert code == 2
    assert "dataset '999' not found under nnUNet_results=" in out and "train a model first: nnUNetv2_train 999" in out


def test_predict_unknown_dataset_name(capsys, nnunet_env):
    code, out = predict(capsys, nnunet_env, dataset="Dataset999_Nope")
    assert code == 2
    assert "model folder not found" in out and "train it first: nnUNetv2_train Dataset999_Nope 2d" in out


def test_predict_unknown_trainer_lists_the_trained_models(capsys, nnunet_env):
    code, out = predict(capsys, nnunet_env, trainer="nnUNetTrainerTypo")
    assert code == 2
    assert "model folder not found" in out and f"trained models of this dataset: {MODEL}" in out


def test_predict_results_not_set(capsys, nnunet_env, monkeypatch):
    monkeypatch.delenv("nnUNet_results")
    code, out = predict(capsys, nnunet_env)
    assert code == 2
    assert "nnUNet_results is not set" in out and "export nnUNet_results=" in out


def test_predict_requested_fold_missing(capsys, nnunet_env):
    code, out = predict(capsys, nnunet_env, "-f", "0", "3")
    assert code == 2
    assert "checkpoint_final.pth missing for fold(s) 3" in out and "pick other folds with -f" in out


def test_predict_checkpoint_no_fold_has(capsys, nnunet_env):
    code, out = predict(capsys, nnunet_env, "-chk", "checkpoint_best.pth")
    assert code == 2
    assert "has checkpoint_best.pth" in out and "name another checkpoint with -chk" in out


def test_predict_bad_fold_value(capsys, nnunet_env):
    code, out = predict(capsys, nnunet_env, "-f", "x")
    assert code == 2
    assert "invalid fold (a number or 'all') value: 'x'" in out


# ------------------------------------------------------------------------------------------------------ compare

@pytest.fixture()
def compare_env(tmp_path, monkeypatch):
    """One trainer with a validated fold 0 (nnU-Net's summary.json format), as tests/test_compare.py builds them."""
    results = tmp_path / "nnUNet_results"
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_results", str(results))
    validation = results / DATASET / f"nnUNetTrainer__{PLANS}__2d" / "fold_0" / "validation"
    validation.mkdir(parents=True)
    per_case = [{"metrics": {"1": {"Dice": 0.8}}, "prediction_file": f"{validation}/case_00.nii.gz",
                 "reference_file": f"{tmp_path}/gt/case_00.nii.gz"}]
    (validation / "summary.json").write_text(json.dumps({"metric_per_case": per_case}))
    return results


def compare(capsys, *extra, dataset="502"):
    return run_cli(capsys, "compare", "-d", dataset, "-c", "2d", *extra)


def test_compare_negative_nsd_tolerance(capsys, compare_env):
    code, out = compare(capsys, "--trainers", "nnUNetTrainer", TRAINER, "--nsd-tolerance", "-1")
    assert code == 2
    assert "--nsd-tolerance must be >= 0 mm" in out


def test_compare_results_not_set(capsys, compare_env, monkeypatch):
    monkeypatch.delenv("nnUNet_results")
    code, out = compare(capsys, "--trainers", "nnUNetTrainer", TRAINER)
    assert code == 1
    assert "nnUNet_results is not set" in out and "meddinov3 env" in out


def test_compare_trainer_named_twice(capsys, compare_env):
    code, out = compare(capsys, "--trainers", "nnUNetTrainer", "nnUNetTrainer")
    assert code == 1
    assert "a trainer is named twice: nnUNetTrainer nnUNetTrainer" in out


def test_compare_unknown_dataset_id(capsys, compare_env):
    code, out = compare(capsys, "--trainers", "nnUNetTrainer", TRAINER, dataset="999")
    assert code == 1
    assert "Could not find a dataset with the ID 999" in out


def test_compare_unknown_dataset_name(capsys, compare_env):
    code, out = compare(capsys, "--trainers", "nnUNetTrainer", TRAINER, dataset="Dataset999_Nope")
    assert code == 1
    assert "no cross-validation results for trainer nnUNetTrainer" in out
    assert "(this folder does not exist)" in out and "Create them with: nnUNetv2_train 999 2d FOLD" in out


# ----------------------------------------------------------------------------------------------------- features

@pytest.fixture()
def features_env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MEDDINOV3_CACHE", str(cache))
    image_2d = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 48), dtype=np.float32)), str(image_2d))
    return {"image": image_2d, "out": tmp_path / "features.png", "tmp": tmp_path}


def features(capsys, env, *extra, image=None, checkpoint="meddinov3-vitb16-ct3m"):
    return run_cli(capsys, "features", "-i", image or env["image"], "--checkpoint", checkpoint, "--size", "32",
                   "-o", env["out"], *extra)


def test_features_image_missing(capsys, features_env):
    missing = features_env["tmp"] / "nope.nii.gz"
    code, out = features(capsys, features_env, image=missing)
    assert code == 1
    assert f"image '{missing}' does not exist" in out
    assert not features_env["out"].exists()


def test_features_slice_on_a_2d_image(capsys, features_env):
    code, out = features(capsys, features_env, "--slice", "2")
    assert code == 1
    assert "--slice 2 given, but 'slice.nii.gz' is a 2D image" in out


def test_features_point_outside_the_slice(capsys, features_env):
    code, out = features(capsys, features_env, "--point", "40", "5")
    assert code == 1
    assert "--point 40 5 is outside the 32x48 slice" in out and "row 0..31, column 0..47" in out


def test_features_registry_name_not_cached(capsys, features_env):
    code, out = features(capsys, features_env)
    assert code == 1
    assert "checkpoint 'meddinov3-vitb16-ct3m' is registered but not in the cache" in out
    assert "meddinov3 weights fetch meddinov3-vitb16-ct3m" in out


# ------------------------------------------------------------------------------------------------------ weights

@pytest.mark.parametrize("action", ["info", "verify"])
def test_weights_missing_file(capsys, tmp_path, action):
    missing = tmp_path / "nope.safetensors"
    code, out = run_cli(capsys, "weights", action, missing)
    assert code == 1
    assert f"checkpoint '{missing}' does not exist" in out


def test_weights_info_on_a_folder_that_is_not_dcp(capsys, tmp_path):
    folder = tmp_path / "not_dcp"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    code, out = run_cli(capsys, "weights", "info", folder)
    assert code == 1
    assert "is not a torch.distributed.checkpoint directory (no .metadata file)" in out


def test_weights_convert_unknown_encoder(capsys, tmp_path, fixtures):
    dst = tmp_path / "x.safetensors"
    code, out = run_cli(capsys, "weights", "convert", fixtures / "official_tiny.pth", dst, "--encoder", "nope")
    assert code == 1
    assert "unknown encoder 'nope'; known:" in out and "meddinov3_vitb16" in out
    assert not dst.exists()


@pytest.mark.parametrize("text", ["not weights at all", "hi there"])  # "h..." makes the unpickler raise KeyError
def test_weights_info_on_a_file_that_is_no_checkpoint(capsys, tmp_path, text):
    garbage = tmp_path / "notes.pth"
    garbage.write_text(text)
    code, out = run_cli(capsys, "weights", "info", garbage)
    assert code == 1 and "is not a PyTorch checkpoint" in out and "accepted:" in out
