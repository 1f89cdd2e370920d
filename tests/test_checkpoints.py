"""Strict loading of every supported layout, and every way a checkpoint can be wrong."""
import pickle

import pytest
import torch

from nnunet_meddinov3.checkpoints import (
    CheckpointMismatchError,
    LayoutError,
    describe_checkpoint,
    detect_layout,
    load_encoder_weights,
    resolve_weights,
    to_encoder_layout,
)
from nnunet_meddinov3.checkpoints import build_encoder


@pytest.fixture()
def official(fixtures):
    return torch.load(fixtures / "official_tiny.pth", weights_only=True)


@pytest.fixture()
def meddino(fixtures):
    return torch.load(fixtures / "meddino_tiny_teacher.pth", weights_only=True)


def test_layouts_are_detected(official, meddino):
    assert detect_layout(official) == "dinov3_reference"
    assert detect_layout(meddino) == "dinov3_training"
    enc = build_encoder("tiny", in_channels=3)
    assert detect_layout(enc.state_dict()) == "encoder"
    with pytest.raises(LayoutError, match="not a DINOv3 checkpoint"):
        detect_layout({"conv.weight": torch.zeros(1)})


def test_training_checkpoint_drops_heads_and_mask_token(meddino):
    state, layout = to_encoder_layout(meddino)
    assert layout == "dinov3_training"
    assert not any("head" in k or "mask_token" in k for k in state)
    assert all(k.startswith("vit.") for k in state)


def test_own_state_dict_round_trips(fixtures):
    src = build_encoder("tiny", in_channels=1, checkpoint=fixtures / "official_tiny.pth")
    dst = build_encoder("tiny", in_channels=1)
    assert load_encoder_weights(dst, src.state_dict()) == "encoder"
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_meddino_weights_into_official_layout_say_which_config_fits(fixtures):
    enc = build_encoder("tiny", in_channels=1)  # official layout: expects q/v biases
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder_weights(enc, fixtures / "meddino_tiny_teacher.pth")
    msg = str(err.value)
    assert "missing in checkpoint" in msg and "blocks.*.attn.q_bias" in msg
    assert "4 storage tokens and no qkv bias: this is the MedDINOv3 layout" in msg
    assert "meddinov3_tiny" in msg


def test_official_weights_with_real_biases_refuse_a_no_bias_encoder(fixtures):
    enc = build_encoder("meddinov3_tiny", in_channels=1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder_weights(enc, fixtures / "official_tiny.pth")
    assert "unexpected in checkpoint" in str(err.value)
    assert "official DINOv3 layout" in str(err.value)


def test_all_zero_qkv_bias_loads_into_no_bias_encoder_exactly(official, reference_inputs):
    # The released distilled B/L/H files carry all-zero q/v biases; dropping them is exact.
    for k in official:
        if k.endswith("qkv.bias"):
            official[k] = torch.zeros_like(official[k])
    with_bias = build_encoder("tiny", in_channels=3, checkpoint=dict(official)).eval()
    without = build_encoder("tiny", in_channels=3, qkv_bias=False, checkpoint=dict(official)).eval()
    with torch.no_grad():
        a = with_bias.intermediate_features(reference_inputs["x"], [3])[0]
        b = without.intermediate_features(reference_inputs["x"], [3])[0]
    assert torch.equal(a, b)


def test_wrong_size_lists_mis_shaped_keys(official):
    enc = build_encoder("tiny", embed_dim=32, num_heads=2, in_channels=3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder_weights(enc, official)
    msg = str(err.value)
    assert "shape mismatch" in msg and "vit.cls_token (1, 1, 64) vs (1, 1, 32)" in msg
    assert "'embed_dim': 64" in msg and "'depth': 4" in msg


def test_missing_and_unexpected_blocks_are_listed(official):
    deeper = build_encoder("tiny", depth=5, in_channels=3)
    with pytest.raises(CheckpointMismatchError, match=r"missing in checkpoint \(\d+\)"):
        load_encoder_weights(deeper, dict(official))
    shallower = build_encoder("tiny", depth=3, in_channels=3)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in checkpoint \(\d+\)"):
        load_encoder_weights(shallower, dict(official))


def test_failed_load_changes_nothing(fixtures):
    enc = build_encoder("tiny", in_channels=1)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(CheckpointMismatchError):
        load_encoder_weights(enc, fixtures / "meddino_tiny_teacher.pth")
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_describe_checkpoint_reads_architecture(official):
    state, _ = to_encoder_layout(official)
    assert describe_checkpoint(state) == {"embed_dim": 64, "depth": 4, "n_storage_tokens": 4, "qkv_bias": True,
                                          "num_heads": 4, "ffn": "mlp", "ffn_hidden_features": 256,
                                          "untie_cls_and_patch_norms": False}


def test_truncated_file_is_a_clear_error(fixtures, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes((fixtures / "official_tiny.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_encoder_weights(build_encoder("tiny"), bad)


class NotATensor:
    pass


def test_pickle_with_code_objects_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"cls_token": NotATensor()}, evil)
    with pytest.raises(ValueError, match="refusing to load"):
        load_encoder_weights(build_encoder("tiny"), evil)


def test_unknown_name_or_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDINOV3_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a registered checkpoint"):
        resolve_weights("no-such-weights")
    with pytest.raises(FileNotFoundError, match="meddinov3 weights fetch meddinov3-vitb16-ct3m"):
        resolve_weights("meddinov3-vitb16-ct3m")


def test_registry_name_resolves_through_the_cache(fixtures, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDINOV3_CACHE", str(tmp_path))
    (tmp_path / "meddinov3-vitb16-ct3m.pth").write_bytes((fixtures / "meddino_tiny_teacher.pth").read_bytes())
    assert resolve_weights("meddinov3-vitb16-ct3m") == tmp_path / "meddinov3-vitb16-ct3m.pth"
    enc = build_encoder("meddinov3_tiny", checkpoint="meddinov3-vitb16-ct3m")
    assert enc.vit.cls_token.abs().sum() > 0


def test_timm_layout_loads(fixtures, reference_inputs):
    import timm
    from timm.models.eva import checkpoint_filter_fn
    official = torch.load(fixtures / "official_tiny.pth", weights_only=True)
    model = timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, embed_dim=64, depth=4,
                              num_heads=4, num_classes=0)
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)
    enc = build_encoder("tiny", in_channels=3, checkpoint=model.state_dict()).eval()
    ref = build_encoder("tiny", in_channels=3, checkpoint=fixtures / "official_tiny.pth").eval()
    with torch.no_grad():
        assert torch.equal(enc.intermediate_features(reference_inputs["x"], [3])[0],
                           ref.intermediate_features(reference_inputs["x"], [3])[0])
