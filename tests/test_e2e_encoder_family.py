"""Fine-tuning from every new DINOv3 encoder through nnU-Net's trainer, end to end at tiny size.

The tiny Meta-made checkpoints of tests/fixtures/family (S+, L+, H+ with SwiGLU; 7B with SwiGLU64 and
no qkv bias; SAT ViT-L with its untied global/local cls norm; ViT-L with an untied cls norm) are each
fine-tuned from, as a user would: the plans name the encoder (`meddinov3 plan_and_preprocess --vit`),
``-tr nnUNetTrainerMedDINOv3_DINOv3`` (the official layout: qkv bias, eps 1e-5) and
``MEDDINOV3_WEIGHTS`` the file, ``MEDDINOV3_RECIPE_OVERRIDE`` the shortest schedule (1 epoch of 2
iterations, 1 validation iteration). The command line has no option for a width of 32, so each model's
plans variant sets the tiny size where the plans hold the network's arguments
(``architecture.arch_kwargs.encoder_overrides``); all variants share one planning and preprocessing
(``data_identifier``), each has a results folder of its own (``Trainer__Plans__2d``).

One model (S+) goes through the console scripts, ``nnUNetv2_train`` (final validation included) and
``nnUNetv2_predict``. The others run in one further Python process through the same nnU-Net code
(``get_trainer_from_args``, the trainer's ``run_training``, ``nnUNetPredictor``): each console cycle
costs ~30 s on a 2-core machine, nearly all of it starting processes (interpreter and imports, the
spawned workers of the final validation and of prediction) rather than training a 2-block model, and
what differs between the encoders is the network, which both paths build and load the same way.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_meddinov3
from e2e_helpers import isolated_nnunet_env, run
from test_encoder_family import MODELS, size_of

pytestmark = pytest.mark.e2e

DATASET = 523  # distinct from the other end-to-end tests
NAME = "EncoderFamily"
TRAINER = "nnUNetTrainerMedDINOv3_DINOv3"
SHORT = {"epochs": 1, "iterations": 2, "val_iterations": 1}
CONSOLE_MODEL = "vits16plus"
IN_PROCESS_MODELS = [m for m in MODELS if m != CONSOLE_MODEL]


def plans_name(model: str) -> str:
    return f"nnUNetPlansMedDINOv3_{model}"


IN_PROCESS = """
import os, sys, traceback, torch
torch.set_num_threads(1)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.run.run_training import get_trainer_from_args
dataset, trainer_name, image, out_root, *jobs = sys.argv[1:]
for job in jobs:
    model, plans, weights = job.split('|')
    try:
        os.environ['MEDDINOV3_WEIGHTS'] = weights
        trainer = get_trainer_from_args(dataset, '2d', 0, trainer_name, plans, device=torch.device('cpu'))
        trainer.run_training()
        predictor = nnUNetPredictor(device=torch.device('cpu'), perform_everything_on_device=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(trainer.output_folder_base, (0,), 'checkpoint_final.pth')
        os.makedirs(os.path.join(out_root, model))  # the sequential path does not create it
        predictor.predict_from_files_sequential([[image]], os.path.join(out_root, model))
    except Exception:
        with open(os.path.join(out_root, model + '.error'), 'w') as f:
            f.write(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, fixtures):
    """Dataset523 (5 training cases: nnU-Net's 5 folds; 1 test case) planned and preprocessed once by
    `meddinov3 plan_and_preprocess --vit vits16plus`, and a plans variant per model with its tiny size."""
    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset

    root = tmp_path_factory.mktemp("encoder_family")
    raw = write_nnunet_raw_dataset(root / "raw", DATASET, name=NAME, num_train=5, num_test=1, shape=(3, 64, 64))
    env = isolated_nnunet_env(root, MEDDINOV3_CACHE=str(root / "cache"),
                              nnUNet_extTrainer=str(Path(nnunet_meddinov3.__file__).parent / "nnunet_ext"),
                              MEDDINOV3_RECIPE_OVERRIDE=" ".join(f"{k}={v}" for k, v in SHORT.items()))
    run(["meddinov3", "plan_and_preprocess", "-d", str(DATASET), "-c", "2d", "--vit", CONSOLE_MODEL,
         "--target-patch", "0", "-np", "1"], env, root)
    # for training only (nnU-Net's planner passes it to torch.set_num_threads, which refuses 0): nnU-Net's
    # single-threaded augmenter, no worker process to start for 2 iterations
    env["nnUNet_n_proc_DA"] = "0"
    family = torch.load(fixtures / "family" / "expected.pt", weights_only=True)["models"]
    pre = root / "pre" / raw.name
    planned = json.loads((pre / "nnUNetPlansMedDINOv3.json").read_text())
    for model, (encoder, extra) in MODELS.items():
        plans = json.loads(json.dumps(planned))
        plans["plans_name"] = plans_name(model)
        arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
        arch["encoder"] = encoder
        arch["encoder_overrides"] = {**size_of(family[model]), **extra}
        (pre / f"{plans_name(model)}.json").write_text(json.dumps(plans, indent=1))
    return {"root": root, "raw": raw, "env": env, "family": family, "weights": fixtures / "family"}


def fold_folder(ws, model: str) -> Path:
    return ws["root"] / "res" / ws["raw"].name / f"{TRAINER}__{plans_name(model)}__2d" / "fold_0"


def check_fine_tuned(ws, model: str, predictions: Path) -> None:
    """Trained to the end, recorded the encoder and the weights file, started from that file's
    tensors, and predicted the test case."""
    from nnunet_meddinov3.checkpoints import build_encoder
    from nnunet_meddinov3.checkpoints.format import file_sha256

    encoder, extra = MODELS[model]
    weights = (ws["weights"] / f"{model}.pth").resolve()
    fold = fold_folder(ws, model)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == SHORT["epochs"] and ckpt["trainer_name"] == TRAINER
    arch = ckpt["init_args"]["plans"]["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert arch["encoder"] == encoder and arch["encoder_overrides"] == {**size_of(ws["family"][model]), **extra}
    record = ckpt["init_args"]["meddinov3_recipe"]
    assert {k: record["values"][k] for k in SHORT} == SHORT
    assert record["weights"]["from"] == "MEDDINOV3_WEIGHTS" and record["weights"]["path"] == str(weights)
    assert record["weights"]["sha256"] == file_sha256(weights)
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"Encoder weights: {weights} (layout {record['weights']['layout']})" in log

    # The encoder started from the fixture's tensors: AdamW moves a weight by at most lr * (1 + wd * |w|)
    # per step (its bias-corrected m / sqrt(v) is <= 1.001 in the first two steps with betas (0.9, 0.98),
    # by Cauchy-Schwarz), and there were `iterations` steps. A random initialisation is off by O(0.1).
    lr, wd = record["values"]["encoder_lr"], record["values"]["weight_decay"]
    steps = SHORT["epochs"] * SHORT["iterations"]
    reference = build_encoder(encoder, in_channels=1, checkpoint=weights, **size_of(ws["family"][model]), **extra)
    state = ckpt["network_weights"]
    for key, value in reference.state_dict().items():
        bound = steps * lr * (1.01 + wd * value.abs().max().item()) + 1e-6 * value.abs().max().item()
        moved = (state[f"encoder.{key}"].float() - value.float()).abs().max().item()
        assert moved <= bound, (model, key, moved, bound)

    import SimpleITK as sitk
    out = predictions / "case_005.nii.gz"
    assert out.exists(), sorted(p.name for p in predictions.iterdir())
    image = sitk.ReadImage(str(ws["raw"] / "imagesTs" / "case_005_0000.nii.gz"))
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == image.GetSize()
    labels = json.loads((ws["raw"] / "dataset.json").read_text())["labels"].values()
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= set(labels)


def test_nnunetv2_train_and_predict_fine_tune_vits16plus(workspace):
    ws = workspace
    weights = ws["weights"] / f"{CONSOLE_MODEL}.pth"
    env = dict(ws["env"], MEDDINOV3_WEIGHTS=str(weights))
    run(["nnUNetv2_train", str(DATASET), "2d", "0", "-tr", TRAINER, "-p", plans_name(CONSOLE_MODEL),
         "-device", "cpu"], env, ws["root"])
    assert (fold_folder(ws, CONSOLE_MODEL) / "validation" / "summary.json").exists()
    pred = ws["root"] / "pred" / CONSOLE_MODEL
    run(["nnUNetv2_predict", "-i", str(ws["raw"] / "imagesTs"), "-o", str(pred), "-d", str(DATASET), "-c", "2d",
         "-p", plans_name(CONSOLE_MODEL), "-tr", TRAINER, "-f", "0", "-device", "cpu"], env, ws["root"])
    check_fine_tuned(ws, CONSOLE_MODEL, pred)


@pytest.fixture(scope="module")
def in_process(workspace):
    """Every other model trained and predicted in one process (see the module docstring); a model that
    fails leaves ``MODEL.error`` with its traceback and the others go on."""
    ws = workspace
    out = ws["root"] / "pred"
    out.mkdir(exist_ok=True)
    jobs = [f"{m}|{plans_name(m)}|{ws['weights'] / f'{m}.pth'}" for m in IN_PROCESS_MODELS]
    run([sys.executable, "-c", IN_PROCESS, str(DATASET), TRAINER,
         str(ws["raw"] / "imagesTs" / "case_005_0000.nii.gz"), str(out), *jobs], ws["env"], ws["root"])
    return out


@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_trainer_and_predictor_fine_tune(in_process, workspace, model):
    error = in_process / f"{model}.error"
    assert not error.exists(), error.read_text()
    check_fine_tuned(workspace, model, in_process / model)
