"""The safetensors checkpoint format: metadata, hashes, atomic writes, and every way a file can be wrong."""
import hashlib
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from reference_tolerances import assert_bf16_rope_close

from nnunet_meddinov3.checkpoints import (
    CheckpointFormatError,
    CheckpointMetadata,
    CheckpointMismatchError,
    LayoutError,
    build_encoder_from_checkpoint,
    load_encoder_weights,
    read_checkpoint,
    read_source,
    resolve_weights,
    tensor_sha256,
    to_encoder_layout,
    write_checkpoint,
)
from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint
from nnunet_meddinov3.checkpoints.format import METADATA_KEY
from nnunet_meddinov3.checkpoints import build_encoder
from nnunet_meddinov3.network.configs import ENCODER_CONFIGS

CT = {"kind": "ct", "window": [-1000.0, 1000.0], "mean": 65.1084, "std": 178.0166}


@pytest.fixture(scope="module")
def official_state(fixtures):
    return to_encoder_layout(torch.load(fixtures / "official_tiny.pth", weights_only=True))[0]


def metadata_for(name="tiny", **fields):
    return CheckpointMetadata(architecture=ENCODER_CONFIGS[name].to_dict(), **fields)


@pytest.fixture()
def written(tmp_path, official_state):
    path = tmp_path / "tiny.safetensors"
    md = metadata_for(intensity=CT, pretraining_resolution=224, stages=[{"name": "gram", "iterations": 10}],
                      data_manifest_sha256="ab" * 32, licence="DINOv3 License", citation="DINOv3 (2025)",
                      source={"file": "official_tiny.pth", "sha256": "cd" * 32})
    return path, write_checkpoint(path, official_state, md)


def test_round_trip_keeps_every_tensor_and_field(written, official_state):
    path, md = written
    loaded = read_checkpoint(path)
    assert set(loaded.state_dict) == set(official_state)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in official_state.items())
    assert loaded.metadata == md
    assert md.rope_periods == [1.0, 3.15625, 10.0, 31.625]  # filled in from the periods tensor
    assert md.architecture == ENCODER_CONFIGS["tiny"].to_dict() and md.in_channels == 3
    # one JSON string under one key: safetensors metadata is str -> str
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header[METADATA_KEY])["intensity"] == CT


def test_tensor_sha256_is_the_documented_definition(official_state):
    digest = hashlib.sha256()
    for key in sorted(official_state):
        t = official_state[key].contiguous()
        shape = ",".join(map(str, t.shape))
        digest.update(f"{key}\0F32\0{shape}\0{t.numel() * 4}\n".encode())
        digest.update(t.numpy().tobytes())
    assert tensor_sha256(official_state) == digest.hexdigest()
    assert tensor_sha256(dict(reversed(list(official_state.items())))) == digest.hexdigest()  # order-free
    same_bytes = dict(official_state, **{"vit.norm.bias": official_state["vit.norm.bias"].view(torch.int32)})
    assert tensor_sha256(same_bytes) != digest.hexdigest()  # the dtype is part of the hash


def test_metadata_dict_round_trip_and_mapping_access(written):
    _, md = written
    again = CheckpointMetadata.from_dict(json.loads(json.dumps(md.to_dict())))
    assert again == md and dict(md)["intensity"] == CT and md["architecture"]["depth"] == 4
    assert md.encoder_config() == ENCODER_CONFIGS["tiny"]


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "unknown field"),
    ({"architecture": {"depth": 4}}, "lacks"),
    ({"architecture": dict(ENCODER_CONFIGS["tiny"].to_dict(), wings=2)}, "unknown field"),
    ({"architecture": dict(ENCODER_CONFIGS["tiny"].to_dict(), rope_dtype="fp16")}, "rope_dtype"),
    ({"intensity": {"kind": "pet"}}, "intensity kind"),
    ({"intensity": {"kind": "ct", "window": [-1000, 1000]}}, "missing"),
    ({"intensity": dict(CT, std=0)}, "std"),
    ({"rope_periods": [1.0, 2.0]}, "rope_periods"),
    ({"format_version": 99}, "newer"),
    ({"data_manifest_sha256": "xyz"}, "data_manifest_sha256"),
    ({"stages": "pretrain"}, "stages"),
])
def test_invalid_metadata_is_refused_with_the_reason(written, change, message):
    _, md = written
    with pytest.raises(CheckpointFormatError, match=message):
        CheckpointMetadata.from_dict(dict(md.to_dict(), **change))


def test_tensors_that_contradict_the_metadata_are_refused(tmp_path, official_state):
    with pytest.raises(CheckpointFormatError, match="depth: 4 vs 5"):
        write_checkpoint(tmp_path / "x.safetensors", official_state,
                         CheckpointMetadata(architecture=ENCODER_CONFIGS["tiny"].replace(depth=5).to_dict()))
    with pytest.raises(CheckpointFormatError, match="qkv_bias"):
        write_checkpoint(tmp_path / "x.safetensors", official_state, metadata_for("meddinov3_tiny"))
    with pytest.raises(CheckpointFormatError, match="'vit.\\*' keys"):
        write_checkpoint(tmp_path / "x.safetensors", {"cls_token": torch.zeros(1)}, metadata_for())
    assert not list(tmp_path.iterdir())


def test_write_is_atomic(tmp_path, written, official_state, monkeypatch):
    path, md = written
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, official_state, md)
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # and no temporary file is left


# --- bad files ------------------------------------------------------------------------------------

def test_truncated_file_is_a_clear_error(written, tmp_path):
    path, _ = written
    for cut in (5, 2000, path.stat().st_size - 100):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(path.read_bytes()[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
            read_checkpoint(bad)


def test_a_flipped_tensor_byte_is_detected(written):
    path, _ = written
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="tensor sha256 mismatch"):
        read_checkpoint(path)
    with pytest.raises(CheckpointFormatError, match="tensor sha256 mismatch"):
        load_encoder_weights(build_encoder("tiny", in_channels=1), path)


@pytest.mark.parametrize("edit", [
    lambda h: h["architecture"].update(norm_eps=1e-6),  # invisible in shapes: only the header says it
    lambda h: h.update(tensor_sha256="0" * 64),
    lambda h: h["intensity"].update(mean=0.0),
])
def test_an_edited_header_is_detected(written, edit):
    path, _ = written
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
    edit(header)
    save_file(load_file(str(path)), str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(header)})
    with pytest.raises(CheckpointFormatError, match="changed after writing"):
        read_checkpoint(path)


def test_invalid_json_header(written):
    path, _ = written
    save_file(load_file(str(path)), str(path), metadata={METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        read_checkpoint(path)


def test_foreign_safetensors_say_what_they_are(tmp_path, official_state):
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in official_state.items()}, bare)
    with pytest.raises(CheckpointFormatError, match="no 'meddinov3' metadata header.*without the 'meddinov3' header"):
        read_checkpoint(bare)
    hf = tmp_path / "model.safetensors"
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 8), "layer.0.norm1.weight": torch.zeros(8)}, hf)
    with pytest.raises(CheckpointFormatError, match="Hugging Face transformers.*meddinov3 weights convert"):
        read_checkpoint(hf)
    resnet = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)}, resnet)
    with pytest.raises(CheckpointFormatError, match="not a DINOv3 checkpoint at all.*ResNet"):
        read_checkpoint(resnet)


def test_a_pth_named_safetensors_is_recognised(tmp_path, fixtures):
    fake = tmp_path / "weights.safetensors"
    fake.write_bytes((fixtures / "official_tiny.pth").read_bytes())
    with pytest.raises(CheckpointFormatError, match=r"PyTorch \(torch.save\) checkpoint"):
        read_checkpoint(fake)


class Payload:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_pickle_and_wrong_layout(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"cls_token": Payload()}, evil)
    with pytest.raises(ValueError, match="refusing to load"):
        read_source(evil)
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ValueError, match="refusing to load|not a readable PyTorch checkpoint"):
        read_source(plain_pickle)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.downsample.0.weight": torch.zeros(8, 8, 1, 1)}, resnet)
    with pytest.raises(LayoutError, match="not a DINOv3 checkpoint.*ResNet"):
        read_source(resnet)
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "epoch": torch.tensor(3)}, nested)
    with pytest.raises(LayoutError, match="nested under \\['model'\\]"):
        read_source(nested)


# --- rebuilding and loading -----------------------------------------------------------------------

def test_encoder_rebuilt_from_metadata_matches_the_reference_as_built(fixtures, tmp_path, reference_inputs):
    # MedDINOv3 computes RoPE in bf16 with LayerNorm eps 1e-6: neither shows in a tensor shape.
    path = tmp_path / "meddino.safetensors"
    convert_checkpoint(fixtures / "meddino_tiny_teacher.pth", path, intensity="ct-meddinov3")
    encoder = build_encoder_from_checkpoint(path, in_channels=3).eval()
    assert encoder.config == ENCODER_CONFIGS["meddinov3_tiny"]
    expected = torch.load(fixtures / "expected_meddino_tiny.pt", weights_only=True)["rope_bf16"]
    with torch.no_grad():
        feats = encoder.intermediate_features(reference_inputs["x"], [0, 1, 2, 3])
    assert_bf16_rope_close(feats, expected["intermediates_norm"])  # computed on another CPU: not bit for bit
    assert encoder.vit.norm.eps == 1e-6  # a wrong eps hides inside that tolerance: checked structurally
    gray = build_encoder_from_checkpoint(path, in_channels=1)  # channel adaptation stays a load-time step
    assert gray.vit.patch_embed.proj.weight.shape[1] == 1


def test_load_encoder_weights_checks_what_shapes_cannot_show(fixtures, tmp_path):
    path = tmp_path / "meddino.safetensors"
    convert_checkpoint(fixtures / "meddino_tiny_teacher.pth", path)
    assert load_encoder_weights(build_encoder("meddinov3_tiny"), path) == "meddinov3"
    same_shapes = build_encoder("tiny", qkv_bias=False)  # identical tensors, official numerics
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder_weights(same_shapes, path)
    msg = str(err.value)
    assert "norm_eps: 1e-06 vs 1e-05" in msg and "rope_dtype: 'bf16' vs 'fp32'" in msg
    assert "fits: meddinov3_tiny" in msg and "shape mismatch" not in msg


def test_zero_qkv_biases_recorded_still_load_into_a_no_bias_encoder(fixtures, tmp_path, reference_inputs):
    official = torch.load(fixtures / "official_tiny.pth", weights_only=True)
    official = {k: torch.zeros_like(v) if k.endswith("qkv.bias") else v for k, v in official.items()}
    torch.save(official, tmp_path / "zero_bias.pth")
    path = tmp_path / "zero_bias.safetensors"
    md = convert_checkpoint(tmp_path / "zero_bias.pth", path)
    assert md.architecture["qkv_bias"] is True
    without = build_encoder("tiny", qkv_bias=False, in_channels=3, checkpoint=path).eval()
    with_bias = build_encoder_from_checkpoint(path, in_channels=3).eval()
    with torch.no_grad():
        assert torch.equal(without(reference_inputs["x"]), with_bias(reference_inputs["x"]))


def test_trainer_path_prefers_the_converted_file(fixtures, tmp_path, monkeypatch):
    # the trainer calls load_encoder_weights(encoder, resolve_weights(name)); fetch writes NAME.safetensors
    monkeypatch.setenv("MEDDINOV3_CACHE", str(tmp_path))
    (tmp_path / "meddinov3-vitb16-ct3m.pth").write_bytes((fixtures / "meddino_tiny_teacher.pth").read_bytes())
    assert resolve_weights("meddinov3-vitb16-ct3m").suffix == ".pth"
    convert_checkpoint(tmp_path / "meddinov3-vitb16-ct3m.pth", tmp_path / "meddinov3-vitb16-ct3m.safetensors")
    path = resolve_weights("meddinov3-vitb16-ct3m")
    assert path == tmp_path / "meddinov3-vitb16-ct3m.safetensors"
    assert load_encoder_weights(build_encoder("meddinov3_tiny"), path) == "meddinov3"


def test_the_format_is_written_and_recognised_only_as_safetensors(written, tmp_path, official_state):
    # a user exporting to weights.pt got a file that nnUNetv2_train then called "not a PyTorch checkpoint"
    path, metadata = written
    with pytest.raises(CheckpointFormatError, match=r"must end in '\.safetensors'.*weights\.safetensors"):
        write_checkpoint(tmp_path / "weights.pt", official_state, metadata)
    assert not (tmp_path / "weights.pt").exists() and not list(tmp_path.glob(".weights*"))
    renamed = tmp_path / "renamed.pt"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"is a safetensors file under another suffix; rename it to 'renamed\.safetensors'"):
        read_source(renamed)  # what reading a .pt does, MEDDINOV3_WEIGHTS in the trainers included
