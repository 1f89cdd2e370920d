"""3d_fullres end to end through the stock commands on the session's stock-planned dataset
(tests/conftest.py): train on nnU-Net's own 3d_fullres plans, resume with --c, validate with --npz and
predict from the checkpoint alone; model selection and ensembling over 2D MedDINOv3, 3D MedDINOv3 and
stock nnU-Net, the export zip; and the one-line error of a 2d configuration given a 3D-only trainer."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from e2e_helpers import run

pytestmark = pytest.mark.e2e

TINY = "nnUNetTrainerMedDINOv3_Tiny"  # trains 2d and 3d_fullres, as nnU-Net's own trainer does
TINY_3D = "nnUNetTrainerMedDINOv3_3D_Tiny"  # the same, 3D only
BASELINE = "nnUNetTrainerShortSchedule"
SHORT = "epochs={epochs} iterations=2 val_iterations=1"


@pytest.fixture(scope="module")
def workspace(stock_planned_ct, tmp_path_factory):
    # results of its own; nnU-Net's 3d_fullres preprocessing is added next to the session's 2d data
    own = tmp_path_factory.mktemp("e2e_3d")
    env = dict(stock_planned_ct["env"], nnUNet_results=str(own / "res"), MEDDINOV3_CACHE=str(own / "cache"),
               nnUNet_n_proc_DA="1", MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=2))
    exported = run(["meddinov3", "env", "--export"], env, own).stdout.strip()
    env["nnUNet_extTrainer"] = exported.split("=", 1)[1].strip("'")
    run(["nnUNetv2_preprocess", "-d", str(stock_planned_ct["id"]), "-c", "3d_fullres", "-np", "1"], env, own)
    return {"root": own, "raw": stock_planned_ct["raw"], "env": env, "id": str(stock_planned_ct["id"]),
            "name": stock_planned_ct["name"]}


def _fold(ws, trainer, configuration):
    return ws["root"] / "res" / ws["name"] / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"


def test_3d_train_resume_validate_and_predict_from_the_checkpoint_alone(workspace):
    ws, env = workspace, workspace["env"]
    train = ["nnUNetv2_train", ws["id"], "3d_fullres", "0", "-tr", TINY, "-device", "cpu"]
    out = run(train, env, ws["root"]).stdout
    assert "Epoch 1" in out
    fold = _fold(ws, TINY, "3d_fullres")
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    # the 2D encoder's keys, unchanged, beside the cross-slice context's
    assert "encoder.vit.rope.periods" in weights and any(k.startswith("slice_context.") for k in weights)
    # the context trains: its zero-initialised output projections have moved
    projections = [v for k, v in weights.items() if k.startswith("slice_context.") and k.endswith("proj.weight")]
    assert projections and any(p.abs().max() > 0 for p in projections)

    resumed = run(train + ["--c"], dict(env, MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=3)), ws["root"]).stdout
    assert "Epoch 2" in resumed and "Epoch 0\n" not in resumed
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 3

    run(train + ["--val", "--npz"], env, ws["root"])
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2", "3"}
    assert sorted(fold.glob("validation/*.npz"))

    pred = ws["root"] / "pred_3d"
    run(["nnUNetv2_predict", "-i", str(ws["raw"] / "imagesTs"), "-o", str(pred), "-d", ws["id"], "-c",
         "3d_fullres", "-tr", TINY, "-f", "0", "-device", "cpu"], env, ws["root"])
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["case_006.nii.gz", "case_007.nii.gz"]
    ws["predictions_3d"] = pred

    # a clinical folder: any file name, no _0000 suffix; the same labels as nnUNetv2_predict's
    clinical = ws["root"] / "clinical"
    clinical.mkdir()
    shutil.copy(ws["raw"] / "imagesTs" / "case_006_0000.nii.gz", clinical / "patient a.nii.gz")
    out = ws["root"] / "clinical_out"
    run(["meddinov3", "predict", "-i", str(clinical), "-o", str(out), "-d", ws["id"], "-c", "3d_fullres", "-tr", TINY,
         "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env, ws["root"])
    read = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in (pred / "case_006.nii.gz", out / "patient a.nii.gz")]
    assert np.array_equal(*read)


def test_model_selection_ensembles_2d_and_3d_with_the_stock_baselines_and_the_zip_installs(workspace, tmp_path):
    ws, env = workspace, dict(workspace["env"], MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=1))
    if not (_fold(ws, TINY, "3d_fullres") / "checkpoint_final.pth").exists():  # when run on its own
        run(["nnUNetv2_train", ws["id"], "3d_fullres", "0", "-tr", TINY, "--npz", "-device", "cpu"], env, ws["root"])
    for trainer, configuration in ((TINY, "2d"), (BASELINE, "2d"), (BASELINE, "3d_fullres")):
        run(["nnUNetv2_train", ws["id"], configuration, "0", "-tr", trainer, "--npz", "-device", "cpu"], env, ws["root"])
    best = run(["nnUNetv2_find_best_configuration", ws["id"], "-c", "2d", "3d_fullres", "-tr", TINY, BASELINE,
                "-f", "0", "-np", "1"], env, ws["root"]).stdout
    for trainer in (TINY, BASELINE):
        for configuration in ("2d", "3d_fullres"):
            assert f"{trainer}__nnUNetPlans__{configuration}:" in best
    assert f"ensemble___{TINY}__nnUNetPlans__2d___{TINY}__nnUNetPlans__3d_fullres___0:" in best

    archive = tmp_path / "model_3d.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", ws["id"], "-o", str(archive), "-c", "3d_fullres", "-tr", TINY,
         "-f", "0"], env, ws["root"])
    installed = dict(env, nnUNet_results=str(tmp_path / "installed"))
    (tmp_path / "installed").mkdir()
    run(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], installed, ws["root"])
    out = tmp_path / "from_zip"
    run(["nnUNetv2_predict", "-i", str(ws["raw"] / "imagesTs"), "-o", str(out), "-d", ws["id"], "-c", "3d_fullres",
         "-tr", TINY, "-f", "0", "-device", "cpu"], installed, ws["root"])
    if "predictions_3d" in ws:  # the same checkpoint predicted before it was zipped
        for case in ("case_006.nii.gz", "case_007.nii.gz"):
            read = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / case))) for folder in (ws["predictions_3d"], out)]
            assert np.array_equal(*read), case


def test_a_2d_configuration_given_a_3d_trainer_says_which_trainer_takes_it(workspace):
    ws = workspace
    done = run(["nnUNetv2_train", ws["id"], "2d", "1", "-tr", TINY_3D, "-device", "cpu"], ws["env"], ws["root"],
               expect_ok=False)
    assert done.returncode != 0
    assert "train it with -tr nnUNetTrainerMedDINOv3_Tiny" in done.stderr.strip().splitlines()[-1]
