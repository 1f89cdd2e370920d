import json
import os
import subprocess

import pytest

from nnunet_meddinov3.training.planner import estimate_training_memory_gb, round_up


def meddinov3(args, env, cwd):
    return subprocess.run(["meddinov3", *args], env=env, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)


def test_round_up_to_patch_multiples():
    assert [round_up(x) for x in (40, 48, 112, 1)] == [48, 48, 112, 16]


def test_memory_model_grows_with_batch_patch_and_model():
    base = estimate_training_memory_gb("vitb16", "multiscale", (896, 896), 2, 14)
    assert 3 < base < 40
    assert estimate_training_memory_gb("vitb16", "multiscale", (896, 896), 4, 14) > base
    assert estimate_training_memory_gb("vitb16", "multiscale", (512, 512), 2, 14) < base
    assert estimate_training_memory_gb("vitl16", "multiscale", (896, 896), 2, 14) > base
    assert estimate_training_memory_gb("vitb16", "bottleneck", (896, 896), 2, 14) < base
    # activation checkpointing keeps ~2 of the ~18 saved tensors per block (plus one block recomputed)
    checkpointed = estimate_training_memory_gb("vitb16", "multiscale", (896, 896), 2, 14, grad_checkpointing=True)
    assert checkpointed < base - 1.5


def _planner_for_a_tiny_dataset(tmp_path, monkeypatch, gpu_memory_gb: float):
    """nnUNetPlannerMedDINOv3 built as ``meddinov3 plan_and_preprocess`` builds it: a raw dataset on disk
    (two 64 x 64 PNG cases), its fingerprint extracted by nnU-Net, then the planner's own constructor."""
    import numpy as np
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    from PIL import Image

    from nnunet_meddinov3.training.planner import nnUNetPlannerMedDINOv3

    raw = tmp_path / "raw" / "Dataset042_Tiny"
    for folder in ("imagesTr", "labelsTr"):
        (raw / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(raw / "imagesTr" / f"{case}_0000.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8)).save(raw / "labelsTr" / f"{case}.png")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                                  "numTraining": 2, "file_ending": ".png"}))
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))  # nnU-Net 2.8 reads these on every use
    extract_fingerprint_dataset(42, num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    return nnUNetPlannerMedDINOv3(42, gpu_memory_target_in_gb=gpu_memory_gb)


def test_planner_with_activation_checkpointing_fits_bigger_batches(tmp_path, monkeypatch):
    planner = _planner_for_a_tiny_dataset(tmp_path, monkeypatch, gpu_memory_gb=40)
    batches = {}
    for checkpointing in (False, True):
        # the options as `meddinov3 plan_and_preprocess --vit vitl16 [--grad-checkpointing]` sets them
        planner.encoder, planner.decoder, planner.grad_checkpointing = "vitl16", "multiscale", checkpointing
        batches[checkpointing] = planner.vit_batch_size([896, 896], 1e12)
        assert planner.architecture()["arch_kwargs"]["grad_checkpointing"] is checkpointing
    assert batches[True] > batches[False] >= 2
    # and the plans nnU-Net's flow writes carry the option
    plans = planner.plan_experiment()
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["grad_checkpointing"] is True
    assert plans["configurations"]["2d"]["patch_size"] == [64, 64]


def test_lora_frees_the_encoders_gradient_and_optimiser_memory():
    full = estimate_training_memory_gb("vitl16", "multiscale", (896, 896), 2, 14)
    lora = estimate_training_memory_gb("vitl16", "multiscale", (896, 896), 2, 14, lora_rank=8)
    # 12 of the 16 bytes of each of ViT-L's ~302 M encoder parameters: grads and two AdamW moments
    assert 3.0 < full - lora < 3.8


def test_planner_switches_checkpointing_on_and_warns_when_the_encoder_does_not_fit(tmp_path, monkeypatch, capsys):
    planner = _planner_for_a_tiny_dataset(tmp_path, monkeypatch, gpu_memory_gb=8)
    capsys.readouterr()
    planner.encoder = "vitb16"  # batch 2 at 896 fits 8 GB as it is: nothing changes
    assert planner.fit_memory("2d_highres", [896, 896], 1e12) == (2, False)
    assert capsys.readouterr().out == ""
    planner.encoder = "vitl16"  # ~15.5 GB at batch 2 without checkpointing, ~11.1 GB with it
    assert planner.fit_memory("2d_highres", [896, 896], 1e12) == (2, True)
    out = capsys.readouterr().out
    assert "activation checkpointing on" in out
    assert "WARNING: 2d_highres" in out and "--recipe lora_rank=8" in out and "--gpu-memory-gb" in out
    planner.fine_tuning_recipe = {"lora_rank": 8}  # frozen ViT-L, checkpointed: ~7.5 GB
    assert planner.fit_memory("2d_highres", [896, 896], 1e12) == (2, True)
    assert "WARNING" not in capsys.readouterr().out
    planner.UNet_vram_target_GB = 80  # a big GPU: no checkpointing, a bigger batch
    batch, checkpointing = planner.fit_memory("2d_highres", [896, 896], 1e12)
    assert not checkpointing and batch > 8


def test_3d_patches_count_as_their_slices_and_give_up_slices_before_the_batch(tmp_path, monkeypatch):
    planner = _planner_for_a_tiny_dataset(tmp_path, monkeypatch, gpu_memory_gb=8)
    # (the plans' lora_targets reach the memory model too)
    planner.encoder, planner.fine_tuning_recipe = "vitl16", {"lora_rank": 8}
    attention_only = planner._memory_gb([896, 896], 2, True)
    planner.fine_tuning_recipe = {"lora_rank": 8, "lora_targets": "qkv,proj,mlp"}  # adapters on the MLP too
    assert planner._memory_gb([896, 896], 2, True) > attention_only
    planner.encoder, planner.fine_tuning_recipe = "vitb16", {}
    # a 3D patch of S slices costs what a 2D batch of S times as many images costs
    assert planner._memory_gb([16, 192, 192], 2, False) == pytest.approx(planner._memory_gb([192, 192], 32, False))
    planner._n_voxels_dataset = 1e12
    plan = {"patch_size": [64, 200, 180], "spacing": [2.5, 0.8, 0.8], "batch_size": 2}
    planned = planner.fullres_configuration(plan)
    slices, *plane = planned["patch_size"]
    assert plane == [208, 192]  # rounded up to multiples of 16
    assert planner.min_slices <= slices < 64  # 64 slices of ViT-B do not fit 8 GB even checkpointed
    assert planned["batch_size"] == 2
    assert planned["architecture"]["network_class_name"] == "nnunet_meddinov3.network.volumetric.MedDINOv3Net3D"
    assert planned["architecture"]["arch_kwargs"]["context"] == "slice_attention"
    planner.UNet_vram_target_GB = 80  # a big GPU keeps nnU-Net's slices
    assert planner.fullres_configuration(plan)["patch_size"][0] == 64


def test_plan_options_are_checked_before_anything_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    proc = meddinov3(["plan_and_preprocess", "-d", "1", "--target-patch", "900"], env, tmp_path)
    assert proc.returncode != 0 and "not a multiple of 16" in proc.stderr and "896" in proc.stderr
    proc = meddinov3(["plan_and_preprocess", "-d", "1"], env, tmp_path)
    assert proc.returncode != 0 and "nnUNet_raw, nnUNet_preprocessed not set" in proc.stderr
    proc = meddinov3(["plan_and_preprocess", "-d", "1", "--recipe", "epochs=300", "lr=1e-4"], env, tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--recipe: unknown recipe key 'lr'. Known keys: epochs, iterations" in proc.stderr


def test_unknown_dataset_and_configuration_are_explained(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"))
    (tmp_path / "raw").mkdir()
    proc = meddinov3(["plan_and_preprocess", "-d", "999"], env, tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "999" in proc.stderr and f"nnUNet_raw={tmp_path / 'raw'}" in proc.stderr
    proc = meddinov3(["plan_and_preprocess", "-d", "999", "-c", "2D"], env, tmp_path)
    assert proc.returncode == 2 and "invalid choice: '2D'" in proc.stderr


def test_images_too_small_for_a_vit_get_a_clear_message(tmp_path):
    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset
    write_nnunet_raw_dataset(tmp_path / "raw", 503, name="Small", num_train=4, num_test=0, shape=(1, 24, 24))
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"))
    proc = meddinov3(["plan_and_preprocess", "-d", "503", "-np", "1", "--no-preprocess"], env, tmp_path)
    assert proc.returncode != 0
    assert "too small for a ViT" in proc.stderr and "nnUNetv2_plan_and_preprocess" in proc.stderr


def test_unknown_subcommand_and_help(tmp_path):
    proc = meddinov3([], dict(os.environ), tmp_path)
    assert proc.returncode == 2 and "plan_and_preprocess" in proc.stdout


def test_env_reports_and_exports_the_trainer_folder(tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    # the folder of the installed plugin the console script runs (not necessarily this checkout's)
    exported = meddinov3(["env", "--export"], base, tmp_path).stdout.strip()
    ours = exported.removeprefix("export nnUNet_extTrainer='").removesuffix("'")
    assert os.path.isdir(ours) and ours.endswith("nnunet_ext")
    proc = meddinov3(["env"], base, tmp_path)
    assert proc.returncode == 1 and "nnUNet_extTrainer: NOT SET" in proc.stdout and "eval" in proc.stdout
    # the same folder written with a trailing slash is ours too, and export keeps other folders
    other = str(tmp_path / "their_trainers")
    env = dict(base, nnUNet_extTrainer=os.pathsep.join([other, ours + os.sep]))
    proc = meddinov3(["env"], env, tmp_path)
    assert proc.returncode == 0 and "nnUNet_extTrainer: set" in proc.stdout
    proc = meddinov3(["env", "--export"], env, tmp_path)
    assert proc.stdout.strip() == f"export nnUNet_extTrainer='{os.pathsep.join([ours, other])}'"
