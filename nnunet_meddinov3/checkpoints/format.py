"""The one checkpoint format the trainer loads and pretraining exports: safetensors + a JSON header.

A file holds the encoder's own ``vit.*`` tensors (those of ``DINOv3Encoder(config, in_channels=3)``:
the RGB patch-embed kernel stays as released, channel adaptation is a load-time step) and, under
the safetensors metadata key ``"meddinov3"``, one JSON object (:class:`CheckpointMetadata`) with
everything needed to rebuild and use the encoder. safetensors holds no pickle, so reading a file
never runs code.

Integrity: the header stores ``tensor_sha256`` (:func:`tensor_sha256`) and ``metadata_sha256`` (the
sha256 of the canonical JSON of every other header field); :func:`read_checkpoint` recomputes both,
so a flipped tensor byte and an edited header are each a clear error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nnunet_meddinov3.checkpoints.converters import (
    ENCODER_PREFIX,
    PATCH_EMBED_KEY,
    PERIODS_KEY,
    LayoutError,
    detect_layout,
)
from nnunet_meddinov3.data.intensity import MEDDINOV3_CT

FORMAT_VERSION = 1
METADATA_KEY = "meddinov3"  # safetensors metadata is str -> str: the whole header is one JSON string here

# safetensors' own dtype names, used in the tensor hash so it does not depend on torch's spelling.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

# Intensity conventions a checkpoint can have been pretrained with: kind -> required fields.
INTENSITY_FIELDS = {
    "ct": ("window", "mean", "std"),      # clip to an HU window, then one global z-score
    "mri": ("percentiles",),              # per-volume percentile clip, then per-volume z-score
    "nnunet": (),                         # whatever nnU-Net's plans say (per-dataset normalisation)
    "imagenet": ("mean", "std"),          # natural RGB images: per-channel mean/std (Meta's weights)
    "unknown": (),
}
INTENSITY_PRESETS = {
    "ct-meddinov3": MEDDINOV3_CT.to_dict(),  # MedDINOv3's CT release (window, mean, std: see MEDDINOV3_CT)
    "nnunet": {"kind": "nnunet"},
    "imagenet": {"kind": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "unknown": {"kind": "unknown"},
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
    _check(isinstance(intensity, dict), f"intensity must be a dict, got {intensity!r}")
    kind = intensity.get("kind")
    _check(kind in INTENSITY_FIELDS, f"intensity kind {kind!r} is not one of {sorted(INTENSITY_FIELDS)}")
    required = set(INTENSITY_FIELDS[kind])
    present = set(intensity) - {"kind"}
    _check(required <= present, f"intensity kind '{kind}' needs {sorted(required)}, missing {sorted(required - present)}")
    if kind == "ct":
        window = intensity["window"]
        _check(isinstance(window, (list, tuple)) and len(window) == 2 and all(map(_is_number, window))
               and window[0] < window[1], f"ct window must be [low, high] with low < high, got {window!r}")
        _check(_is_number(intensity["mean"]), "ct mean must be a number")
        _check(_is_number(intensity["std"]) and intensity["std"] > 0, "ct std must be a positive number")
    if kind == "mri":
        p = intensity["percentiles"]
        _check(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_number, p)) and 0 <= p[0] < p[1] <= 100,
               f"mri percentiles must be [low, high] within 0..100, got {p!r}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in intensity.items()}


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

    def encoder_config(self):
        from nnunet_meddinov3.network.encoder import EncoderConfig
        return EncoderConfig(**self.architecture)

    def validate(self) -> "CheckpointMetadata":
        from nnunet_meddinov3.network.encoder import EncoderConfig

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
    from nnunet_meddinov3.checkpoints.loading import describe_checkpoint

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


def write_checkpoint(path: str | os.PathLike, state_dict: dict, metadata: CheckpointMetadata) -> CheckpointMetadata:
    """Write ``state_dict`` (encoder keys) with ``metadata`` atomically; returns the metadata as written.

    Empty ``rope_periods`` are taken from the tensor. The file appears complete or not at all:
    it is written to a temporary file in the same folder, then renamed over ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
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

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: _canonical_json(metadata.to_dict())})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a shared cache needs the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return metadata


# --- read --------------------------------------------------------------------------------------

_LAYOUT_NAMES = {
    "hf_transformers": "Hugging Face transformers DINOv3ViTModel weights",
    "timm": "timm DINOv3 (Eva) weights",
    "encoder": "this project's encoder keys without the 'meddinov3' header (a bare save_file of encoder.state_dict()?)",
    "dinov3_reference": "Meta's DINOv3 reference layout (DinoVisionTransformer.state_dict())",
    "dinov3_backbone_prefixed": "a dinov3 training teacher/student dict",
}


def _foreign_file_message(path: Path, keys: list[str]) -> str:
    try:
        layout = detect_layout(dict.fromkeys(keys))
        what = f"it looks like {_LAYOUT_NAMES.get(layout, layout)}"
        fix = (f"Convert it once with `meddinov3 weights convert {path} OUT.safetensors` "
               "(add --encoder NAME if the architecture cannot be inferred)")
    except LayoutError as e:
        what, fix = f"and it is not a DINOv3 checkpoint at all ({e})", "Use a DINOv3/MedDINOv3 checkpoint"
    return (f"'{path}' has no '{METADATA_KEY}' metadata header, so it is not in this project's checkpoint "
            f"format; {what}. {fix}.")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """(safetensors metadata, tensor names) without reading any tensor; clear error if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    with open(path, "rb") as f:
        start = f.read(9)
    # safetensors begins with a little-endian u64 header length, then the JSON header ('{')
    header_length = int.from_bytes(start[:8], "little") if len(start) == 9 else -1
    looks_safetensors = start[8:9] == b"{" and 0 < 8 + header_length <= path.stat().st_size
    if not looks_safetensors and (start[:2] == b"PK" or start[:1] == b"\x80"):  # torch.save zip / legacy pickle
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
    from safetensors.torch import load_file

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
        state = load_file(str(path))
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


def build_encoder_from_checkpoint(path: str | os.PathLike | LoadedCheckpoint, in_channels: int = 1,
                                  **overrides):
    """Rebuild the encoder from the file's metadata, then load its weights strictly.

    ``path`` may also be a checkpoint already read (and hash-checked) by :func:`read_checkpoint`.
    ``overrides`` change training-only settings (e.g. ``drop_path_rate``); anything that would
    change the numerics is refused by the strict load's architecture check.
    """
    from nnunet_meddinov3.checkpoints.loading import load_encoder_weights
    from nnunet_meddinov3.network.encoder import DINOv3Encoder

    checkpoint = path if isinstance(path, LoadedCheckpoint) else read_checkpoint(path)
    config = checkpoint.metadata.encoder_config()
    if overrides:
        config = config.replace(**overrides)
    encoder = DINOv3Encoder(config, in_channels=in_channels)
    load_encoder_weights(encoder, checkpoint)
    return encoder


# --- convert anything into the format ----------------------------------------------------------

def _hf_config_hints(path: Path) -> dict:
    """Architecture facts from a Hugging Face ``config.json`` next to the weights, if there is one."""
    config_file = path.parent / "config.json"
    if path.is_dir() or not config_file.is_file():
        return {}
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        import warnings

        # the architecture is then inferred from the tensors alone: say so rather than guess silently
        warnings.warn(f"ignoring unreadable {config_file} ({e}); inferring the architecture from the weights")
        return {}
    if cfg.get("model_type") != "dinov3_vit":
        return {}
    hints = {"num_heads": cfg.get("num_attention_heads"), "norm_eps": cfg.get("layer_norm_eps"),
             "rope_base": cfg.get("rope_theta")}
    return {k: v for k, v in hints.items() if v is not None}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, encoder: str | None = None,
                       intensity: dict | str | None = None, licence: str | None = None,
                       citation: str | None = None, pretraining_resolution: int | None = None,
                       source_extra: dict | None = None) -> CheckpointMetadata:
    """Convert any supported checkpoint (file or DCP directory) into this project's format at ``dst``.

    The architecture is ``encoder`` (a named config) if given, else the one recorded (our format)
    or inferred from the layout and shapes. The source's file name and sha256 are recorded. The
    tensors are loaded strictly into an encoder built from that architecture before anything is
    written, and the written file is read back with its hashes checked.
    """
    from nnunet_meddinov3.checkpoints.converters import infer_encoder_config
    from nnunet_meddinov3.checkpoints.loading import read_source, with_reference_periods, without_zero_qkv_biases
    from nnunet_meddinov3.network.encoder import resolve_encoder_config

    src = Path(src)
    source = read_source(src)
    state = dict(source.state)
    previous = source.metadata
    if encoder is not None:
        config = resolve_encoder_config(encoder)
    elif previous is not None:
        config = previous.encoder_config()
    else:
        config = infer_encoder_config(state, source.layout, **_hf_config_hints(src))

    state = without_zero_qkv_biases(with_reference_periods(state, config), config)

    if isinstance(intensity, str):
        if intensity not in INTENSITY_PRESETS:
            raise ValueError(f"unknown intensity preset '{intensity}'; known: {', '.join(INTENSITY_PRESETS)}")
        intensity = INTENSITY_PRESETS[intensity]
    if intensity is None:
        if previous is not None:
            intensity = previous.intensity
        elif source.layout in ("dinov3_reference", "timm", "hf_transformers"):
            intensity = INTENSITY_PRESETS["imagenet"]  # Meta's released weights: natural RGB images
        else:
            intensity = INTENSITY_PRESETS["unknown"]

    if src.is_dir():
        source_info = {"file": src.name, "kind": "dcp_directory",
                       "metadata_file_sha256": file_sha256(src / ".metadata"), **source.details}
    else:
        source_info = {"file": src.name, "sha256": file_sha256(src)}
    source_info["layout"] = source.layout
    if previous is not None and previous.source:
        source_info["converted_from"] = previous.source
    source_info.update(source_extra or {})

    kernel = state.get(PATCH_EMBED_KEY)
    metadata = CheckpointMetadata(
        architecture=config.to_dict(),
        intensity=intensity,
        in_channels=int(kernel.shape[1]) if kernel is not None else 3,
        pretraining_resolution=pretraining_resolution or (previous.pretraining_resolution if previous else None),
        stages=list(previous.stages) if previous else [],
        data_manifest_sha256=previous.data_manifest_sha256 if previous else None,
        licence=licence or (previous.licence if previous else "")
        or f"{DINOV3_LICENCE}; derived from Meta's DINOv3 weights",
        citation=citation or (previous.citation if previous else "") or DINOV3_CITATION,
        source=source_info,
    )
    _check_loads(state, config)  # strict load into an encoder built from the config, before writing anything
    written = write_checkpoint(dst, state, metadata)
    read_checkpoint(dst)  # and the file on disk reads back with both hashes intact
    return written


def _check_loads(state: dict, config) -> None:
    """The strict load (keys, shapes, architecture) into an encoder of ``config``, without copying values.

    The encoder is built on the meta device: nothing is allocated or initialised, so checking a
    ViT-L costs no more than checking the tiny model.
    """
    import warnings

    from nnunet_meddinov3.checkpoints.loading import load_encoder_weights
    from nnunet_meddinov3.network.encoder import DINOv3Encoder

    kernel = state.get(PATCH_EMBED_KEY)
    with torch.device("meta"):
        encoder = DINOv3Encoder(config, in_channels=int(kernel.shape[1]) if kernel is not None else 3)
    with warnings.catch_warnings():  # copying into meta tensors is the intended no-op
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        load_encoder_weights(encoder, state)
