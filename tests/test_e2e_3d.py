"""The 3D trainers end to end through the stock commands on the session's stock-planned dataset
(tests/conftest.py): train on nnU-Net's own 3d_fullres plans, resume with --c, validate with --npz and
predict from the checkpoint alone; and the one-line errors of a configuration of the other kind."""
import json

import pytest
import torch
from e2e_helpers import run

pytestmark = pytest.mark.e2e

TINY_3D = "nnUNetTrainerMedDINOv3_3D_Tiny"
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


def test_3d_train_resume_validate_and_predict_from_the_checkpoint_alone(workspace):
    ws, env = workspace, workspace["env"]
    train = ["nnUNetv2_train", ws["id"], "3d_fullres", "0", "-tr", TINY_3D, "-device", "cpu"]
    out = run(train, env, ws["root"]).stdout
    assert "Epoch 1" in out
    fold = ws["root"] / "res" / ws["name"] / f"{TINY_3D}__nnUNetPlans__3d_fullres" / "fold_0"
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
         "3d_fullres", "-tr", TINY_3D, "-f", "0", "-device", "cpu"], env, ws["root"])
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["case_006.nii.gz", "case_007.nii.gz"]


@pytest.mark.parametrize("configuration, trainer, says", [
    ("3d_fullres", "nnUNetTrainerMedDINOv3_Tiny", "train it with -tr nnUNetTrainerMedDINOv3_3D_Tiny"),
    ("2d", TINY_3D, "train it with -tr nnUNetTrainerMedDINOv3_Tiny"),
])
def test_a_configuration_of_the_other_kind_says_which_trainer_takes_it(workspace, configuration, trainer, says):
    ws = workspace
    done = run(["nnUNetv2_train", ws["id"], configuration, "1", "-tr", trainer, "-device", "cpu"], ws["env"],
               ws["root"], expect_ok=False)
    assert done.returncode != 0
    assert says in done.stderr.strip().splitlines()[-1]
