"""LoRA fine-tuning through the stock commands: nnUNetv2_train with the recipe override on the Tiny trainer,
--c, --val and nnUNetv2_predict from the checkpoint alone, then `meddinov3 weights merge-lora`."""
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs the 'lora' extra (pip install 'nnunet-meddinov3[lora]')")

import nnunet_meddinov3  # noqa: E402
from e2e_helpers import isolated_nnunet_env, run  # noqa: E402

pytestmark = pytest.mark.e2e

DATASET = 507
TINY = "nnUNetTrainerMedDINOv3_Tiny"
LORA = "lora_rank=8 lora_targets=qkv,proj,mlp"
SHORT = "epochs={epochs} iterations=2 val_iterations=1"


def _base_weights(network_weights: dict) -> dict:
    """The encoder's base tensors of a LoRA network's state dict, under their plain names."""
    return {k.replace(".base_layer.", ".")[len("encoder."):]: v for k, v in network_weights.items()
            if k.startswith("encoder.") and ".lora_" not in k and not k.endswith("._extra_state")}


def test_lora_run_trains_resumes_validates_and_predicts_with_the_base_unchanged(tmp_path, fixtures):
    from nnunet_meddinov3.checkpoints import build_encoder, build_encoder_from_checkpoint
    from nnunet_meddinov3.cli.main import main as meddinov3
    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset
    from nnunet_meddinov3.network import lora

    raw = write_nnunet_raw_dataset(tmp_path / "raw", DATASET, num_train=5, num_test=1, shape=(3, 64, 64))
    weights = tmp_path / "tiny_weights.pth"
    shutil.copy(fixtures / "meddino_tiny_teacher.pth", weights)
    env = isolated_nnunet_env(tmp_path, nnUNet_n_proc_DA="1", MEDDINOV3_CACHE=str(tmp_path / "cache"),
                              nnUNet_extTrainer=str(Path(nnunet_meddinov3.__file__).parent / "nnunet_ext"))
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET), "-c", "2d", "-np", "1"], env, tmp_path)
    train = ["nnUNetv2_train", str(DATASET), "2d", "0", "-tr", TINY, "-device", "cpu"]
    out = run(train, dict(env, MEDDINOV3_WEIGHTS=str(weights),
                          MEDDINOV3_RECIPE_OVERRIDE=f"{LORA} {SHORT.format(epochs=1)}"), tmp_path).stdout
    assert "LoRA: rank=8, alpha=16.0, targets=qkv,proj,mlp" in out and "Encoder weights:" in out
    fold = next((tmp_path / "res").glob(f"Dataset{DATASET}_*")) / f"{TINY}__nnUNetPlans__2d" / "fold_0"
    first = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert first["init_args"]["meddinov3_recipe"]["values"]["lora_rank"] == 8

    # Nothing outside the results folder from here on; --c keeps the recorded LoRA recipe without being told.
    weights.unlink()
    resumed = run(train + ["--c"], dict(env, MEDDINOV3_RECIPE_OVERRIDE=SHORT.format(epochs=2)), tmp_path).stdout
    assert "Epoch 1" in resumed and "Epoch 0\n" not in resumed
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = final["network_weights"]
    assert final["current_epoch"] == 2 and final["init_args"]["meddinov3_recipe"]["values"]["lora_rank"] == 8
    assert state["encoder.lora._extra_state"]["rank"] == 8

    # the adapters trained, the base encoder is bit for bit the pretrained one (patch kernel adapted to 1 channel)
    reference = build_encoder("meddinov3_tiny", in_channels=1, checkpoint=fixtures / "meddino_tiny_teacher.pth")
    base = _base_weights(state)
    assert set(base) == set(reference.state_dict())
    assert all(torch.equal(base[k], v) for k, v in reference.state_dict().items())
    b_first = {k: v for k, v in first["network_weights"].items() if ".lora_B." in k}
    assert any(v.abs().max() > 0 for v in b_first.values())
    assert any(not torch.equal(state[k], v) for k, v in b_first.items())  # and went on training after --c

    run(train + ["--val"], env, tmp_path)
    assert (fold / "validation" / "summary.json").exists()
    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET), "-c", "2d",
         "-tr", TINY, "-f", "0", "-device", "cpu"], env, tmp_path)
    assert [p.name for p in pred.glob("*.nii.gz")] == ["case_005.nii.gz"]

    merged = tmp_path / "merged.safetensors"
    assert meddinov3(["weights", "merge-lora", str(fold / "checkpoint_final.pth"), "--output", str(merged)]) == 0
    encoder = build_encoder_from_checkpoint(merged, in_channels=1)
    expected = lora.merged_state_dict(state, "encoder.")
    assert all(torch.equal(v, expected[f"encoder.{k}"]) for k, v in encoder.state_dict().items())
    assert not torch.equal(encoder.state_dict()["vit.blocks.0.attn.qkv.weight"], base["vit.blocks.0.attn.qkv.weight"])
