"""The one checkpoint format the trainer loads and pretraining exports: safetensors + a JSON header.

A file holds the encoder's own ``vit.*`` tensors (those of ``DINOv3Encoder(config, in_channels=3)``:
the RGB patch-embed kernel stays as released, channel adaptation is a load-time step) and, under
the safetensors metadata key ``"meddinov3"``, one JSON object (:class:`CheckpointMetadata`) with
everything needed to rebuild and use the encoder. safetensors holds no pickle, so reading a file
never runs code.

Integrity: the header stores ``tensor_sha256`` (:func:`tensor_sha256`) and ``metadata_sha256`` (the
sha256 of the canonical JSON of every other header field); :func:`read_checkpoint` recomputes both,
so a flipped tensor byte and an edited header are each a clear error.

This module reads, writes and verifies files only; turning other layouts into this format is
:mod:`~nnunet_meddinov3.checkpoints.conversion`, loading into an encoder
:mod:`~nnunet_meddinov3.checkpoints.loading`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
import safetensors.torch

from nnunet_meddinov3.checkpoints.keys import (
    ENCODER_PREFIX,
    LAYOUT_NAMES,
    PATCH_EMBED_KEY,
    PERIODS_KEY,
    LayoutError,
    describe_checkpoint,
    detect_layout,
)
from nnunet_meddinov3.data.intensity import IntensityError
from nnunet_meddinov3.data.intensity import validate_intensity as validate_intensity_schema
from nnunet_meddinov3.durable_files import file_kind, write_atomically
from nnunet_meddinov3.network.configs import FFN_LAYERS, EncoderConfig

FORMAT_VERSION = 1
METADATA_KEY = "meddinov3"  # safetensors metadata is str -> str: the whole header is one JSON string here

# safetensors' own dtype names, used in the tensor hash so it does not depend on torch's spelling.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

DINOV3_LICENCE = "DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/)"
DINOV3_CITATION = ("Simeoni et al., DINOv3, arXiv:2508.10104 (2025)")
MEDDINOV3_CITATION = ("Li et al., MedDINOv3: How to adapt vision foundation models for medical image "
                      "segmentation?, arXiv:2509.02379 (2025)")


class CheckpointFormatError(ValueError):
    """A file that is not (or no longer) a valid checkpoint in this project's format."""


# --- the tensor hash ---------------------------------------------------------------------------

def tensor_sha256(state_dict: dict) -> str:
    """sha256 over all tensors, independent of dict order and of how the file lays them out.

    For each key in sorted (Python str) order, the hash is fed
    ``key + "\\0" + dtype + "\\0" + shape + "\\0" + nbytes + "\\n"`` (UTF-8; dtype in safetensors'
    names such as ``F32``/``BF16``; shape as comma-separated decimals, empty for a scalar; nbytes
    in decimal), then the tensor's raw bytes in C order and native byte order (little endian on
    every platform torch supports, and what safetensors stores).
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"'{key}' is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"'{key}' has dtype {tensor.dtype}, which the format does not store")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        shape = ",".join(str(s) for s in tensor.shape)
        digest.update(f"{key}\0{SAFETENSORS_DTYPES[tensor.dtype]}\0{shape}\0{nbytes}\n".encode())
        if nbytes:
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical_json(obj) -> str:
    # repr-exact floats, sorted keys, no whitespace: the same dict always gives the same bytes
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# --- metadata ----------------------------------------------------------------------------------

def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointFormatError(f"invalid checkpoint metadata: {message}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_intensity(intensity) -> dict:
    """The header's ``intensity``, checked against the schema of :mod:`nnunet_meddinov3.data.intensity`."""
    try:
        return validate_intensity_schema(intensity)
    except IntensityError as e:
        raise CheckpointFormatError(f"invalid checkpoint metadata: {e}") from e


@dataclass
class CheckpointMetadata:
    """Everything needed to rebuild and use an encoder, stored as the file's JSON header.

    ``architecture`` is the full EncoderConfig dict; ``rope_periods`` the exact periods (also the
    ``vit.rope.periods`` tensor); ``intensity`` the normalisation used in pretraining;
    ``in_channels`` the channels of the stored patch-embed kernel; ``stages`` the pretraining
    history (one dict per stage); ``source`` where the weights came from (file name, sha256,
    layout). ``tensor_sha256``/``metadata_sha256`` are filled in by :func:`write_checkpoint`.
    """

    architecture: dict
    rope_periods: list = field(default_factory=list)
    intensity: dict = field(default_factory=lambda: {"kind": "unknown"})
    in_channels: int = 3
    pretraining_resolution: int | None = None
    stages: list = field(default_factory=list)
    data_manifest_sha256: str | None = None
    licence: str = ""
    citation: str = ""
    source: dict | None = None
    format_version: int = FORMAT_VERSION
    tensor_sha256: str | None = None
    metadata_sha256: str | None = None

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(**self.architecture)

    def validate(self) -> "CheckpointMetadata":
        _check(isinstance(self.format_version, int) and not isinstance(self.format_version, bool),
               "format_version must be an integer")
        _check(self.format_version <= FORMAT_VERSION,
               f"format_version {self.format_version} was written by a newer nnunet-meddinov3 "
               f"(this one reads up to {FORMAT_VERSION}); upgrade the package")
        _check(isinstance(self.architecture, dict), "architecture must be a dict (an EncoderConfig)")
        names = {f.name for f in dataclasses.fields(EncoderConfig)}
        unknown = set(self.architecture) - names
        _check(not unknown, f"architecture has unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        missing = {"embed_dim", "depth", "num_heads"} - set(self.architecture)
        _check(not missing, f"architecture lacks {sorted(missing)}")
        arch = EncoderConfig(**self.architecture).to_dict()  # the full dict, defaults filled in
        for key in ("embed_dim", "depth", "num_heads", "n_storage_tokens", "patch_size"):
            _check(isinstance(arch[key], int) and not isinstance(arch[key], bool) and arch[key] >= 0,
                   f"architecture {key} must be a non-negative integer, got {arch[key]!r}")
        _check(arch["num_heads"] > 0 and arch["embed_dim"] % arch["num_heads"] == 0
               and (arch["embed_dim"] // arch["num_heads"]) % 4 == 0,
               f"embed_dim {arch['embed_dim']} / num_heads {arch['num_heads']} must give a head dim divisible by 4")
        _check(isinstance(arch["qkv_bias"], bool), "architecture qkv_bias must be true or false")
        full = dataclasses.asdict(EncoderConfig(**arch))  # with the fields to_dict leaves out at their defaults
        _check(full["ffn_layer"] in FFN_LAYERS,
               f"architecture ffn_layer must be one of {', '.join(FFN_LAYERS)}, got {full['ffn_layer']!r}")
        _check(isinstance(full["untie_cls_and_patch_norms"], bool),
               "architecture untie_cls_and_patch_norms must be true or false")
        for key in ("mlp_ratio", "layer_scale_init", "norm_eps", "rope_base", "drop_path_rate"):
            _check(_is_number(arch[key]), f"architecture {key} must be a number, got {arch[key]!r}")
        _check(arch["rope_dtype"] in ("fp32", "bf16"), f"rope_dtype must be 'fp32' or 'bf16', got {arch['rope_dtype']!r}")
        _check(arch["rope_normalize_coords"] in ("separate", "min", "max"),
               f"rope_normalize_coords must be separate/min/max, got {arch['rope_normalize_coords']!r}")
        self.architecture = arch

        n_periods = arch["embed_dim"] // arch["num_heads"] // 4
        _check(isinstance(self.rope_periods, list) and len(self.rope_periods) == n_periods
               and all(_is_number(p) and p > 0 for p in self.rope_periods),
               f"rope_periods must be {n_periods} positive numbers (head dim / 4), got {self.rope_periods!r}")
        self.intensity = validate_intensity(self.intensity)
        _check(isinstance(self.in_channels, int) and self.in_channels > 0, "in_channels must be a positive integer")
        _check(self.pretraining_resolution is None or (isinstance(self.pretraining_resolution, int)
                                                       and self.pretraining_resolution > 0),
               "pretraining_resolution must be a positive integer or null")
        _check(isinstance(self.stages, list) and all(isinstance(s, dict) for s in self.stages),
               "stages must be a list of dicts")
        for name in ("data_manifest_sha256", "tensor_sha256", "metadata_sha256"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None),
                   f"{name} must be 64 lowercase hex digits or null, got {value!r}")
        _check(isinstance(self.licence, str) and isinstance(self.citation, str), "licence and citation must be strings")
        _check(self.source is None or isinstance(self.source, dict), "source must be a dict or null")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # Read-only mapping access, so ``dict(metadata)`` and ``metadata["intensity"]`` work too.
    def keys(self):
        return self.to_dict().keys()

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointMetadata":
        _check(isinstance(data, dict), f"the header must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        _check(not unknown, f"unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        _check("architecture" in data, "'architecture' is required")
        return cls(**data).validate()

    def content_sha256(self) -> str:
        """sha256 of the canonical JSON of every field but ``metadata_sha256`` itself."""
        content = {k: v for k, v in self.to_dict().items() if k != "metadata_sha256"}
        return hashlib.sha256(_canonical_json(content).encode()).hexdigest()


@dataclass
class LoadedCheckpoint:
    state_dict: dict
    metadata: CheckpointMetadata
    path: Path | None = None


# --- write -------------------------------------------------------------------------------------

def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with storage of its own (safetensors refuses shared/strided views)."""
    t = tensor.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def _check_encoder_keys(state_dict: dict) -> None:
    foreign = [k for k in state_dict if not k.startswith(ENCODER_PREFIX)]
    if foreign:
        raise CheckpointFormatError(f"the format stores the encoder's own 'vit.*' keys; got {foreign[:5]} "
                                    "(convert with to_encoder_layout first)")
    if PERIODS_KEY not in state_dict:
        raise CheckpointFormatError(f"'{PERIODS_KEY}' is missing: the format stores the exact RoPE periods")


def check_state_matches_metadata(state_dict: dict, metadata: CheckpointMetadata) -> None:
    """The tensors must be the encoder's keys and agree with the architecture in the header."""
    _check_encoder_keys(state_dict)
    arch = metadata.architecture
    facts = describe_checkpoint(state_dict)
    expected = {"embed_dim": arch["embed_dim"], "depth": arch["depth"], "num_heads": arch["num_heads"],
                "n_storage_tokens": arch["n_storage_tokens"]}
    wrong = {k: (facts.get(k), v) for k, v in expected.items() if facts.get(k) != v}
    has_bias = any(k.endswith("attn.q_bias") for k in state_dict)
    if has_bias != arch["qkv_bias"]:
        wrong["qkv_bias"] = (has_bias, arch["qkv_bias"])
    kernel = state_dict.get(PATCH_EMBED_KEY)
    if kernel is not None and kernel.shape[1] != metadata.in_channels:
        wrong["in_channels"] = (kernel.shape[1], metadata.in_channels)
    if wrong:
        raise CheckpointFormatError("tensors and metadata disagree (tensors vs metadata): "
                                    + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in wrong.items()))
    periods = state_dict[PERIODS_KEY].float().tolist()
    if periods != [float(p) for p in metadata.rope_periods]:
        raise CheckpointFormatError(f"metadata rope_periods {metadata.rope_periods} differ from the "
                                    f"'{PERIODS_KEY}' tensor {periods}")


def require_safetensors_suffix(path: str | os.PathLike) -> Path:
    """``path``, if it ends in ``.safetensors``. The loaders tell this format from torch.save files by
    the suffix, so a weights.pt holding it would be written fine and refused at the first nnUNetv2_train."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointFormatError(f"'{path}' is a folder; give the file's name, e.g. '{path / 'encoder.safetensors'}'")
    if path.suffix != ".safetensors":
        raise CheckpointFormatError(f"'{path}': weights in this project's format are safetensors files and must "
                                    f"end in '.safetensors' (the loaders go by the suffix); write "
                                    f"'{path.with_suffix('.safetensors')}'")
    return path


def write_checkpoint(path: str | os.PathLike, state_dict: dict, metadata: CheckpointMetadata) -> CheckpointMetadata:
    """Write ``state_dict`` (encoder keys) with ``metadata`` atomically; returns the metadata as written.

    Empty ``rope_periods`` are taken from the tensor. The file appears complete or not at all:
    it is written to a temporary file in the same folder, then renamed over ``path``.
    """
    path = require_safetensors_suffix(path)
    tensors = {k: _owned(v) for k, v in state_dict.items()}
    _check_encoder_keys(tensors)
    metadata = dataclasses.replace(metadata)
    if not metadata.rope_periods and PERIODS_KEY in tensors:
        metadata.rope_periods = tensors[PERIODS_KEY].float().tolist()
    metadata.format_version = FORMAT_VERSION
    metadata.tensor_sha256 = tensor_sha256(tensors)
    metadata.metadata_sha256 = None
    metadata.validate()
    check_state_matches_metadata(tensors, metadata)
    metadata.metadata_sha256 = metadata.content_sha256()

    header = {"format": "pt", METADATA_KEY: _canonical_json(metadata.to_dict())}
    write_atomically(path, lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata=header),
                     write_to="path", hidden=True)
    return metadata


# --- read --------------------------------------------------------------------------------------

def _foreign_file_message(path: Path, keys: list[str]) -> str:
    try:
        layout = detect_layout(dict.fromkeys(keys))
        what = f"it looks like {LAYOUT_NAMES.get(layout, layout)}"
        fix = (f"Convert it once with `meddinov3 weights convert {path} OUT.safetensors` "
               "(add --encoder NAME if the architecture cannot be inferred)")
    except LayoutError as e:
        what, fix = f"and it is not a DINOv3 checkpoint at all ({e})", "Use a DINOv3/MedDINOv3 checkpoint"
    return (f"'{path}' has no '{METADATA_KEY}' metadata header, so it is not in this project's checkpoint "
            f"format; {what}. {fix}.")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """(safetensors metadata, tensor names) without reading any tensor; clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if file_kind(path) in ("zip", "pickle"):  # torch.save's format / its legacy one
        raise CheckpointFormatError(
            f"'{path}' is a PyTorch (torch.save) checkpoint, not a safetensors file; convert it with "
            f"`meddinov3 weights convert {path} OUT.safetensors`")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for every malformed file
        raise CheckpointFormatError(
            f"'{path}' is not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> LoadedCheckpoint:
    """Read a file in this project's format, checking both hashes (``verify=False`` skips them)."""
    path = Path(path)
    header, keys = read_safetensors_header(path)
    if METADATA_KEY not in header:
        raise CheckpointFormatError(_foreign_file_message(path, keys))
    try:
        raw = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"'{path}': the '{METADATA_KEY}' header is not valid JSON ({e})") from e
    try:
        metadata = CheckpointMetadata.from_dict(raw)
    except (CheckpointFormatError, TypeError) as e:
        raise CheckpointFormatError(f"'{path}': {e}") from e
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as e:
        raise CheckpointFormatError(f"'{path}' is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if verify:
        if metadata.metadata_sha256 != metadata.content_sha256():
            raise CheckpointFormatError(
                f"'{path}': the metadata header was changed after writing (metadata sha256 mismatch: stored "
                f"{metadata.metadata_sha256}, computed {metadata.content_sha256()}). Re-export or re-convert the file.")
        actual = tensor_sha256(state)
        if actual != metadata.tensor_sha256:
            raise CheckpointFormatError(
                f"'{path}': tensor sha256 mismatch (stored {metadata.tensor_sha256}, computed {actual}): the "
                "weights were modified or corrupted after writing. Re-download or re-convert the file.")
    check_state_matches_metadata(state, metadata)
    return LoadedCheckpoint(state_dict=state, metadata=metadata, path=path)
