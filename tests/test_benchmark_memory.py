"""The memory benchmark behind benchmark/RESULTS.md's "Memory per image" rows counts what autograd keeps."""
import pytest

from nnunet_meddinov3.benchmark.lora_cost import measure


@pytest.fixture(scope="module")
def forward_only():
    def run(checkpointing: bool) -> dict:
        return measure("vits16", 224, "full", rank=8, alpha=16.0, targets="qkv,proj", warmup=0, repeats=1,
                       grad_checkpointing=checkpointing, forward_only=True)
    return run


def test_saved_bytes_match_the_tensors_a_vit_keeps(forward_only):
    record = forward_only(False)
    # ViT-S at 224: 14 x 14 patches + 1 cls + 4 storage tokens, width 384, 12 blocks of ~23 such tensors (fp32)
    one_tensor_gib = (14 * 14 + 5) * 384 * 4 / 2 ** 30
    per_block = record["saved_by_encoder_gib"] / (12 * one_tensor_gib)
    assert 18 < per_block < 28, per_block
    assert record["saved_for_backward_gib"] >= record["saved_by_encoder_gib"]
    assert record["step_s"] and record["peak_rss_gib"] >= record["rss_after_build_gib"]


def test_checkpointing_keeps_only_the_block_inputs(forward_only):
    plain, checkpointed = forward_only(False), forward_only(True)
    assert checkpointed["saved_by_encoder_gib"] < plain["saved_by_encoder_gib"] / 5
