"""End to end through the real console scripts on a tiny synthetic dataset (no mocks).

The stock commands must find our trainer through nnU-Net's own nnUNet_extTrainer lookup, train,
resume with --c, and predict with the pretrained weights file deleted; in 2D and in 3D (3d_fullres),
with model selection and ensembling across both and the stock baselines.
"""
import hashlib
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytestmark = pytest.mark.e2e

DATASET = 501
TINY = "nnUNetTrainerMedDINOv3_Tiny"  # trains 2d and 3d_fullres, as nnU-Net's own trainer does
TINY_3D = "nnUNetTrainerMedDINOv3_3D_Tiny"  # the same, 3D only
BASELINE = "nnUNetTrainerShortSchedule"
SHORT = "epochs={epochs} iterations=2 val_iterations=1"  # a recipe short enough for a test


from e2e_helpers import run  # noqa: E402  (shared by the e2e tests; see tests/e2e_helpers.py)


@pytest.fixture(scope="module")
def workspace(stock_planned_ct, fixtures):
    # the session's stock-planned dataset (tests/conftest.py); this module owns its folder
    root, raw = stock_planned_ct["root"], stock_planned_ct["raw"]
    assert stock_planned_ct["id"] == DATASET
    weights = root / "tiny_weights.pth"
    shutil.copy(fixtures / "meddino_tiny_teacher.pth", weights)
    env = dict(stock_planned_ct["env"], nnUNet_n_proc_DA="1", MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=2))
    exported = run(["meddinov3", "env", "--export"], env, root).stdout.strip()
    assert exported.startswith("export nnUNet_extTrainer=")
    env["nnUNet_extTrainer"] = exported.split("=", 1)[1].strip("'")
    # with activation checkpointing, so the 2d_highres training below runs it through nnU-Net for real
    # with a recipe in the plans (the trainings on these plans run without the environment override)
    run(["meddinov3", "plan_and_preprocess", "-d", str(DATASET), "--target-patch", "128", "--grad-checkpointing",
         "-np", "1", "--recipe", *SHORT.format(epochs=1).split()], env, root)
    run(["nnUNetv2_preprocess", "-d", str(DATASET), "-c", "3d_fullres", "-np", "1"], env, root)  # stock 3D plans
    return {"root": root, "raw": raw, "env": env, "weights": weights}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def results_folder(ws, plans, config="2d"):
    return ws["root"] / "res" / f"Dataset{DATASET:03d}_SyntheticCT" / f"{TINY}__{plans}__{config}"


def test_env_reports_the_trainer_folder(workspace):
    out = run(["meddinov3", "env"], workspace["env"], workspace["root"]).stdout
    assert "nnUNet_extTrainer: set" in out


def test_our_plans_are_vit_plans(workspace):
    plans = json.loads((workspace["root"] / "pre" / f"Dataset{DATASET:03d}_SyntheticCT" /
                        "nnUNetPlansMedDINOv3.json").read_text())
    assert set(plans["configurations"]) == {"2d", "2d_highres", "3d_fullres"}  # no 3d_lowres, no cascade
    c3d = plans["configurations"]["3d_fullres"]
    assert c3d["architecture"]["network_class_name"] == "nnunet_meddinov3.network.volumetric.MedDINOv3Net3D"
    assert all(p % 16 == 0 for p in c3d["patch_size"][1:]) and c3d["data_identifier"].startswith("nnUNetPlansMedDINOv3")
    c2d, hi = plans["configurations"]["2d"], plans["configurations"]["2d_highres"]
    assert all(p % 16 == 0 for p in c2d["patch_size"] + hi["patch_size"])
    assert hi["patch_size"] == [128, 128]
    for s_hi, s, p, p_hi in zip(hi["spacing"], c2d["spacing"], c2d["patch_size"], hi["patch_size"]):
        assert s_hi == pytest.approx(s * p / p_hi)  # same field of view
    assert c2d["architecture"]["network_class_name"] == "nnunet_meddinov3.network.meddinov3_net.MedDINOv3Net"
    assert c2d["architecture"]["arch_kwargs"]["grad_checkpointing"] is True
    assert hi["data_identifier"] != c2d["data_identifier"]
    stock = json.loads((workspace["root"] / "pre" / f"Dataset{DATASET:03d}_SyntheticCT" /
                        "nnUNetPlans.json").read_text())
    assert "PlainConvUNet" in stock["configurations"]["2d"]["architecture"]["network_class_name"]


def test_train_on_stock_plans_resume_and_predict_without_weights(workspace):
    ws, env = workspace, dict(workspace["env"], MEDDINOV3_WEIGHTS=str(workspace["weights"]))
    train = ["nnUNetv2_train", str(DATASET), "2d", "0", "-tr", TINY, "-device", "cpu"]
    out = run(train, env, ws["root"]).stdout
    assert "Encoder weights:" in out and "layout dinov3_training" in out
    fold = results_folder(ws, "nnUNetPlans") / "fold_0"
    assert (fold / "checkpoint_final.pth").exists()
    assert (fold / "validation" / "summary.json").exists()

    # Nothing outside the results folder is needed any more: resume and predict without the weights.
    ws["weights"].unlink()
    # One more epoch: a change of a resumed run's recipe is asked for explicitly, and recorded.
    resumed = run(train + ["--c"], dict(env, MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=3)), ws["root"]).stdout
    assert "Epoch 2" in resumed and "Epoch 0\n" not in resumed and "Encoder weights:" not in resumed
    assert "changed by MEDDINOV3_RECIPE_OVERRIDE: epochs 2 -> 3" in resumed
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3 and ckpt["trainer_name"] == TINY
    assert "encoder.vit.rope.periods" in ckpt["network_weights"]
    record = ckpt["init_args"]["meddinov3_recipe"]
    assert record["values"]["epochs"] == 3 and record["history"][0]["changed"] == {"epochs": [2, 3]}
    assert record["weights"]["from"] == "MEDDINOV3_WEIGHTS" and len(record["weights"]["sha256"]) == 64

    pred = ws["root"] / "pred_stock_plans"
    run(["nnUNetv2_predict", "-i", str(ws["raw"] / "imagesTs"), "-o", str(pred), "-d", str(DATASET), "-c", "2d",
         "-tr", TINY, "-f", "0", "-device", "cpu"], env, ws["root"])
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["case_006.nii.gz", "case_007.nii.gz"]
    # the model-selection test compares its installed model's predictions with these
    ws["stock_predictions"] = (pred, _sha256(fold / "checkpoint_final.pth"))
    run(["nnUNetv2_evaluate_folder", str(ws["raw"] / "labelsTs"), str(pred), "-djfile",
         str(ws["raw"] / "dataset.json"), "-pfile", str(pred / "plans.json")], env, ws["root"])
    summary = json.loads((pred / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3"}


def test_3d_fullres_trains_from_2d_weights_resumes_validates_and_predicts_from_the_checkpoint_alone(workspace, fixtures):
    ws = workspace
    train = ["nnUNetv2_train", str(DATASET), "3d_fullres", "0", "-tr", TINY, "-device", "cpu"]
    weights = str(fixtures / "meddino_tiny_teacher.pth")  # a 2D checkpoint: the encoder runs on every slice
    out = run(train, dict(ws["env"], MEDDINOV3_WEIGHTS=weights), ws["root"]).stdout
    assert "Encoder weights:" in out and "Epoch 1" in out
    fold = results_folder(ws, "nnUNetPlans", "3d_fullres") / "fold_0"
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    # the 2D encoder's keys, unchanged, beside the cross-slice context's, whose zero-initialised output
    # projections have trained
    assert "encoder.vit.rope.periods" in weights
    projections = [v for k, v in weights.items() if k.startswith("slice_context.") and k.endswith("proj.weight")]
    assert projections and any(p.abs().max() > 0 for p in projections)

    resumed = run(train + ["--c"], dict(ws["env"], MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=3)), ws["root"]).stdout
    assert "Epoch 2" in resumed and "Epoch 0\n" not in resumed
    run(train + ["--val", "--npz"], ws["env"], ws["root"])
    assert list((fold / "validation").glob("*.npz"))

    pred = ws["root"] / "pred_3d"
    run(["nnUNetv2_predict", "-i", str(ws["raw"] / "imagesTs"), "-o", str(pred), "-d", str(DATASET), "-c",
         "3d_fullres", "-tr", TINY, "-f", "0", "-device", "cpu"], ws["env"], ws["root"])
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["case_006.nii.gz", "case_007.nii.gz"]
    # a clinical folder (any file name, no _0000): the same labels as nnUNetv2_predict's
    clinical, labels = ws["root"] / "clinical_3d", ws["root"] / "clinical_3d_out"
    clinical.mkdir()
    shutil.copy(ws["raw"] / "imagesTs" / "case_006_0000.nii.gz", clinical / "patient a.nii.gz")
    run(["meddinov3", "predict", "-i", str(clinical), "-o", str(labels), "-d", str(DATASET), "-c", "3d_fullres",
         "-tr", TINY, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], ws["env"], ws["root"])
    read = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in (pred / "case_006.nii.gz", labels / "patient a.nii.gz")]
    assert np.array_equal(*read)


def test_a_2d_configuration_given_a_3d_only_trainer_says_which_trainer_takes_it(workspace):
    done = run(["nnUNetv2_train", str(DATASET), "2d", "1", "-tr", TINY_3D, "-device", "cpu"], workspace["env"],
               workspace["root"], expect_ok=False)
    assert done.returncode != 0
    assert f"train it with -tr {TINY}" in done.stderr.strip().splitlines()[-1]


def test_nnunet_model_selection_ensembling_and_zip_export_take_our_trainer(workspace, fixtures, tmp_path):
    """The tools users pick and ship models with, next to the stock baselines on the same fold:
    --val --npz, find_best_configuration over 2d and 3d_fullres (with ensembles), export to zip, install
    into an empty results folder and predict from there with no weights file anywhere."""
    ws, env = workspace, dict(workspace["env"])
    fold = results_folder(ws, "nnUNetPlans") / "fold_0"
    if not (fold / "checkpoint_final.pth").exists():  # when run on its own
        shutil.copy(fixtures / "meddino_tiny_teacher.pth", ws["weights"])
        run(["nnUNetv2_train", str(DATASET), "2d", "0", "-tr", TINY, "-device", "cpu"],
            dict(env, MEDDINOV3_WEIGHTS=str(ws["weights"])), ws["root"])
        ws["weights"].unlink()
    run(["nnUNetv2_train", str(DATASET), "2d", "0", "-tr", TINY, "--val", "--npz", "-device", "cpu"], env, ws["root"])
    assert list((fold / "validation").glob("*.npz"))
    baseline = BASELINE
    one_epoch = dict(env, MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=1))  # enough for a model to ensemble with
    if not list((results_folder(ws, "nnUNetPlans", "3d_fullres") / "fold_0" / "validation").glob("*.npz")):
        run(["nnUNetv2_train", str(DATASET), "3d_fullres", "0", "-tr", TINY, "--npz", "-device", "cpu"], one_epoch,
            ws["root"])  # when run on its own
    for configuration in ("2d", "3d_fullres"):
        run(["nnUNetv2_train", str(DATASET), configuration, "0", "-tr", baseline, "--npz", "-device", "cpu"],
            one_epoch, ws["root"])

    best = run(["nnUNetv2_find_best_configuration", str(DATASET), "-c", "2d", "3d_fullres", "-tr", baseline, TINY,
                "-f", "0", "-np", "1"], env, ws["root"]).stdout
    for trainer in (TINY, baseline):
        assert f"{trainer}__nnUNetPlans__2d:" in best and f"{trainer}__nnUNetPlans__3d_fullres:" in best
    assert f"ensemble___{baseline}__nnUNetPlans__2d___{TINY}__nnUNetPlans__2d___0:" in best
    assert f"ensemble___{TINY}__nnUNetPlans__2d___{TINY}__nnUNetPlans__3d_fullres___0:" in best

    archive = tmp_path / "model.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", str(DATASET), "-o", str(archive), "-c", "2d", "-tr", TINY,
         "-f", "0"], env, ws["root"])
    installed = dict(env, nnUNet_results=str(tmp_path / "installed"))
    (tmp_path / "installed").mkdir()
    run(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], installed, ws["root"])
    assert not ws["weights"].exists()
    predictions = {}
    for name, environment in (("original", env), ("installed", installed)):
        out = tmp_path / name
        earlier, digest = ws.get("stock_predictions", (None, None))
        if name == "original" and digest == _sha256(fold / "checkpoint_final.pth"):
            out = earlier  # test_train_on_stock_plans predicted with this very checkpoint already
        else:
            run(["nnUNetv2_predict", "-i", str(ws["raw"] / "imagesTs"), "-o", str(out), "-d", str(DATASET), "-c",
                 "2d", "-tr", TINY, "-f", "0", "-device", "cpu"], environment, ws["root"])
        predictions[name] = {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in out.glob("*.nii.gz")}
    assert sorted(predictions["installed"]) == ["case_006.nii.gz", "case_007.nii.gz"]
    for case, labels in predictions["original"].items():
        assert np.array_equal(labels, predictions["installed"][case]), case


def test_train_resume_and_predict_on_our_highres_plans_with_their_recipe(workspace):
    """The recipe in our plans (1 epoch) trains, is logged and recorded; --c refuses when the plans'
    recipe has changed since, and goes on when MEDDINOV3_RECIPE_OVERRIDE names the change."""
    # in bf16 on the CPU (MEDDINOV3_CPU_BF16) and with activation checkpointing (the plans): both real
    ws = workspace
    env = {k: v for k, v in ws["env"].items() if k != "MEDDINOV3_RECIPE_OVERRIDE"}
    env["MEDDINOV3_CPU_BF16"] = "1"
    train = ["nnUNetv2_train", str(DATASET), "2d_highres", "1", "-tr", TINY, "-p", "nnUNetPlansMedDINOv3",
             "-device", "cpu"]
    out = run(train, env, ws["root"]).stdout
    assert "Epoch 0" in out and "Epoch 1" not in out
    folder = results_folder(ws, "nnUNetPlansMedDINOv3", "2d_highres")
    assert (folder / "fold_1" / "checkpoint_final.pth").exists()
    log = next((folder / "fold_1").glob("training_log_*.txt")).read_text()
    assert re.search(r"epochs +?= 1 +\(plans nnUNetPlansMedDINOv3/2d_highres\)", log), log[-3000:]
    losses = [float(line.split()[-1]) for line in log.splitlines() if "_loss " in line]
    assert losses and all(math.isfinite(v) for v in losses), losses  # train_loss, val_loss in bf16

    plans_file = ws["root"] / "pre" / f"Dataset{DATASET:03d}_SyntheticCT" / "nnUNetPlansMedDINOv3.json"
    original = plans_file.read_text()
    plans = json.loads(original)
    plans["configurations"]["2d_highres"]["meddinov3"]["epochs"] = 2
    plans_file.write_text(json.dumps(plans))
    try:
        refused = run(train + ["--c"], env, ws["root"], expect_ok=False)
        assert refused.returncode != 0
        text = refused.stdout + refused.stderr
        assert "epochs: checkpoint epochs=1 (plans nnUNetPlansMedDINOv3/2d_highres), now epochs=2" in text
        assert "MEDDINOV3_RECIPE_OVERRIDE='epochs=2'" in text and "Epoch 1" not in text
        resumed = run(train + ["--c"], dict(env, MEDDINOV3_RECIPE_OVERRIDE="epochs=2"), ws["root"]).stdout
        assert "Epoch 1" in resumed and "Epoch 0\n" not in resumed
    finally:
        plans_file.write_text(original)
    ckpt = torch.load(folder / "fold_1" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2
    assert ckpt["init_args"]["meddinov3_recipe"]["history"][0]["changed"] == {"epochs": [1, 2]}
    pred = ws["root"] / "pred_highres"
    run(["nnUNetv2_predict", "-i", str(ws["raw"] / "imagesTs"), "-o", str(pred), "-d", str(DATASET), "-c",
         "2d_highres", "-p", "nnUNetPlansMedDINOv3", "-tr", TINY, "-f", "1", "-device", "cpu"], env, ws["root"])
    import SimpleITK as sitk
    for case in ("case_006", "case_007"):
        src = sitk.ReadImage(str(ws["raw"] / "imagesTs" / f"{case}_0000.nii.gz"))
        out = sitk.ReadImage(str(pred / f"{case}.nii.gz"))
        assert out.GetSize() == src.GetSize() and out.GetSpacing() == pytest.approx(src.GetSpacing())


def test_missing_pretrained_weights_stop_training_with_instructions(workspace):
    ws = workspace
    proc = run(["nnUNetv2_train", str(DATASET), "2d", "2", "-tr", "nnUNetTrainerMedDINOv3", "-device", "cpu"],
               ws["env"], ws["root"], expect_ok=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "meddinov3 weights fetch meddinov3-vitb16-ct3m" in text
    assert "MEDDINOV3_WEIGHTS" in text


def test_pretrain_chain_export_then_finetune_by_name(workspace):
    """Unlabelled images -> three pretraining stages -> export -> nnUNetv2_train loads it by name."""
    ws = workspace
    env = dict(ws["env"], MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=1))
    run([sys.executable, "-m", "pretrain", "chain", "--configs", "tiny_stage1", "tiny_stage2_gram",
         "tiny_stage3_highres", "--data", str(ws["raw"]), "--output", str(ws["root"] / "pretrain_run"),
         "--export", "tiny_ct_chain", "1:train.iterations=4", "1:train.checkpoint_every=2",
         "2:train.iterations=2", "3:train.iterations=2"], env, ws["root"])
    assert (ws["root"] / "cache" / "exports" / "tiny_ct_chain.safetensors").exists()
    out = run(["nnUNetv2_train", str(DATASET), "2d", "3", "-tr", TINY, "-device", "cpu"],
              dict(env, MEDDINOV3_WEIGHTS="tiny_ct_chain"), ws["root"]).stdout
    assert "tiny_ct_chain.safetensors (layout meddinov3)" in out


LOAD_WITH_TRAINER = """
import os, sys, torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunet_meddinov3.training.trainer import nnUNetTrainerMedDINOv3_Tiny
pre = os.path.join(os.environ['nnUNet_preprocessed'], 'Dataset501_SyntheticCT')
for path in sys.argv[1:]:
    os.environ['MEDDINOV3_WEIGHTS'] = path
    plans = dict(load_json(os.path.join(pre, 'nnUNetPlans.json')), continue_training=False)
    trainer = nnUNetTrainerMedDINOv3_Tiny(plans, '2d', 0, load_json(os.path.join(pre, 'dataset.json')),
                                          device=torch.device('cpu'))
    trainer.initialize()
    trainer.load_pretrained_encoder()
    torch.save(trainer.network.encoder.state_dict(), path + '.loaded.pt')
"""


def test_trainer_fine_tunes_from_every_converter(workspace, fixtures, tmp_path):
    """Each foreign layout -> `meddinov3 weights convert` -> the trainer's own loading step."""
    from safetensors.torch import save_file
    from test_converters import dinov3_training_dcp, reference_to_hf, save_dcp

    from nnunet_meddinov3.checkpoints import build_encoder
    teacher = torch.load(fixtures / "meddino_tiny_teacher.pth", weights_only=True)["teacher"]
    backbone = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    sources = {"pth": fixtures / "meddino_tiny_teacher.pth", "dcp": tmp_path / "dcp" / "99"}
    save_dcp(dinov3_training_dcp(teacher), sources["dcp"])
    sources["hf"] = tmp_path / "hf" / "model.safetensors"
    sources["hf"].parent.mkdir()
    save_file(reference_to_hf(backbone), sources["hf"])
    timm_state = {k[len("vit."):]: v.contiguous() for k, v in build_encoder(
        "meddinov3_tiny", in_channels=3, checkpoint=fixtures / "meddino_tiny_teacher.pth").state_dict().items()
        if k != "vit.rope.periods"}
    sources["timm"] = tmp_path / "timm.safetensors"
    save_file(timm_state, sources["timm"])

    converted = []
    for name, src in sources.items():
        dst = tmp_path / f"converted_{name}.safetensors"
        run(["meddinov3", "weights", "convert", str(src), str(dst), "--encoder", "meddinov3_tiny"],
            workspace["env"], tmp_path)
        converted.append(str(dst))
    run([sys.executable, "-c", LOAD_WITH_TRAINER, *converted], workspace["env"], tmp_path)
    reference = build_encoder("meddinov3_tiny", in_channels=1, checkpoint=fixtures / "meddino_tiny_teacher.pth")
    for path in converted:
        loaded = torch.load(path + ".loaded.pt", weights_only=True)
        for key, value in reference.state_dict().items():
            assert torch.allclose(loaded[key].float(), value.float(), atol=1e-6), (path, key)
