"""Strict loading of encoder weights from any known layout, with errors that say what would fit."""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import safetensors.torch

from nnunet_meddinov3.checkpoints.converters import read_dcp_backbone, to_encoder_layout
from nnunet_meddinov3.checkpoints.format import (
    METADATA_KEY,
    CheckpointMetadata,
    LoadedCheckpoint,
    read_checkpoint,
    read_safetensors_header,
)
from nnunet_meddinov3.checkpoints.keys import (  # noqa: F401  (describe_checkpoint: part of this API)
    PATCH_EMBED_KEY,
    PERIODS_KEY,
    QKV_BIAS_SUFFIXES,
    describe_checkpoint,
    has_nonzero_qkv_bias,
)
from nnunet_meddinov3.checkpoints.registry import resolve_weights
from nnunet_meddinov3.durable_files import file_kind
from nnunet_meddinov3.network.configs import ENCODER_CONFIGS, EncoderConfig, resolve_encoder_config
from nnunet_meddinov3.network.encoder import ROPE_DTYPES, DINOv3Encoder, reference_rope_periods

logger = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """Checkpoint and encoder disagree; the message lists every difference and what would fit."""


def read_state_dict(path: str | os.PathLike) -> dict:
    """Read a checkpoint without executing pickled code.

    ``.safetensors`` must be in this project's format (hash-checked; other safetensors files are
    refused with a message saying what they look like and how to convert them); a directory must
    be a dinov3 DCP checkpoint (its backbone is consolidated); anything else is read with
    ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        return read_checkpoint(path).state_dict
    if path.is_dir():
        return read_dcp_backbone(path)[0]  # refuses a folder that is not a DCP checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, KeyError) as e:  # a text file makes the unpickler raise KeyError
        kind = file_kind(path)
        if kind == "safetensors":
            raise ValueError(f"'{path}' is a safetensors file under another suffix; rename it to "
                             f"'{path.with_suffix('.safetensors').name}' (safetensors files are read by their suffix)") from e
        if kind not in ("zip", "pickle"):  # torch.save's format or its legacy one, or a raw pickle
            raise ValueError(f"'{path}' is not a PyTorch checkpoint (neither a torch.save file nor a pickle); "
                             f"accepted: .safetensors (this project's format, timm, Hugging Face), .pth/.pt/.bin "
                             f"weight files (Meta, MedDINOv3, timm), dinov3 DCP folders") from e
        raise ValueError(
            f"refusing to load '{path}': it is a pickle holding more than tensors and plain "
            f"containers ({(str(e).splitlines() or [type(e).__name__])[0]}). Only weight files are accepted.") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return state


def adapt_patch_embed(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map an RGB patch-embed kernel (D, 3, p, p) to ``in_channels`` input channels.

    Rule: the summed RGB kernel, divided equally over the channels. A gray image therefore gives
    exactly the features of that image repeated to RGB (at a third of the cost), and a C-channel
    input whose channels are identical gives the same features as that single channel.
    """
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise CheckpointMismatchError(
            f"checkpoint patch embedding takes {weight.shape[1]} channels; the encoder takes "
            f"{in_channels}. Only 3-channel (RGB) kernels are adapted to other channel counts.")
    summed = weight.sum(dim=1, keepdim=True)
    return (summed / in_channels).repeat(1, in_channels, 1, 1)


def without_zero_qkv_biases(state: dict, config) -> dict:
    """``state`` without its q/v biases when ``config`` has none and they are all zero (Meta's
    distilled B/L/H files carry such biases): dropping them is exact."""
    if config.qkv_bias or has_nonzero_qkv_bias(state):
        return state
    return {k: v for k, v in state.items() if not k.endswith(QKV_BIAS_SUFFIXES)}


def with_reference_periods(state: dict, config) -> dict:
    """``state`` with the RoPE periods the reference computes for ``config`` (bf16-rounded, in its
    RoPE dtype) when it stores none: timm and Hugging Face files never do, and the weights were
    trained with those."""
    if PERIODS_KEY in state:
        return state
    return {**state, PERIODS_KEY: reference_rope_periods(config).to(ROPE_DTYPES[config.rope_dtype])}


def fitting_configs(facts: dict) -> list[str]:
    names = []
    for name, cfg in ENCODER_CONFIGS.items():
        if all(getattr(cfg, k) == v for k, v in facts.items() if hasattr(cfg, k)):
            names.append(name)
    return names


def _layout_hint(facts: dict) -> str:
    if facts.get("n_storage_tokens") == 4 and not facts.get("qkv_bias"):
        return ("checkpoint has 4 storage tokens and no qkv bias: this is the MedDINOv3 layout "
                "(use a 'meddinov3_*' encoder, e.g. trainer nnUNetTrainerMedDINOv3)")
    if facts.get("qkv_bias"):
        return ("checkpoint has non-zero qkv biases: this is the official DINOv3 layout "
                "(use a plain 'vit*16' encoder, e.g. trainer nnUNetTrainerMedDINOv3_DINOv3)")
    return ""


def _mismatch_message(missing, unexpected, misshaped, facts, source) -> str:
    lines = [f"encoder weights from {source} do not fit the encoder:"]
    for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                         ("shape mismatch (checkpoint vs encoder)", misshaped)):
        if items:
            grouped = sorted({re.sub(r"blocks\.\d+\.", "blocks.*.", k) for k in items})
            lines.append(f"  {title} ({len(items)}): " + ", ".join(grouped[:30])
                         + (" ..." if len(grouped) > 30 else ""))
    lines.append(f"  checkpoint architecture: {facts}")
    fits = fitting_configs(facts)
    lines.append(f"  encoder configs that would fit: {', '.join(fits) if fits else 'none of the named ones'}")
    hint = _layout_hint(facts)
    if hint:
        lines.append("  " + hint)
    return "\n".join(lines)


# EncoderConfig fields that change what the weights compute. drop_path_rate and layer_scale_init
# only matter for training from scratch, so a fine-tuning run may differ there.
ARCHITECTURE_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "ffn_layer", "n_storage_tokens", "qkv_bias",
                       "untie_cls_and_patch_norms", "norm_eps", "rope_base", "rope_normalize_coords", "rope_dtype",
                       "patch_size")


def architecture_differences(recorded: dict, config, state: dict | None = None) -> dict:
    """{field: (checkpoint value, encoder value)} for every field in ARCHITECTURE_FIELDS that differs.

    A checkpoint with qkv biases that are all zero loads exactly into an encoder without them, so
    that one difference is allowed; so is another spelling of the same feed-forward layer (SwiGLU
    ratio and alignment that give the same width compute the same function).
    """
    theirs = dataclasses.asdict(EncoderConfig(**recorded))  # defaults for fields an older file leaves out
    ours = dataclasses.asdict(config)
    diffs = {k: (theirs[k], ours[k]) for k in ARCHITECTURE_FIELDS if theirs[k] != ours[k]}
    if diffs.get("qkv_bias") == (True, False) and state is not None and not has_nonzero_qkv_bias(state):
        del diffs["qkv_bias"]
    if {"mlp_ratio", "ffn_layer"} & set(diffs) and _same_ffn(EncoderConfig(**recorded), config):
        diffs.pop("mlp_ratio", None), diffs.pop("ffn_layer", None)
    return diffs


def _same_ffn(a: EncoderConfig, b: EncoderConfig) -> bool:
    return (a.gated_ffn, a.ffn_hidden_features) == (b.gated_ffn, b.ffn_hidden_features)


def _architecture_message(diffs: dict, recorded: dict, name: str) -> str:
    fits = [n for n, cfg in ENCODER_CONFIGS.items() if not architecture_differences(recorded, cfg)]
    lines = [f"encoder weights from {name} were pretrained with a different architecture than this encoder "
             "(checkpoint vs encoder):"]
    lines += [f"  {k}: {a!r} vs {b!r}" for k, (a, b) in diffs.items()]
    lines.append("  (LayerNorm eps and the RoPE dtype do not show in tensor shapes; the file's metadata records them)")
    lines.append("  build the encoder from the file instead (build_encoder_from_checkpoint), or use a config that "
                 f"fits: {', '.join(fits) if fits else 'none of the named ones; pass the recorded architecture'}")
    return "\n".join(lines)


def _read_source(source, name: str | None = None):
    """(raw state dict, recorded architecture or None, display name, layout name or None); ``name``
    names a state dict the caller read from a file."""
    if isinstance(source, LoadedCheckpoint):
        return source.state_dict, source.metadata.architecture, f"'{source.path}'", "meddinov3"
    if isinstance(source, dict):
        return source, None, name or "the given state dict", None
    path = resolve_weights(source)
    if path.suffix == ".safetensors":
        checkpoint = read_checkpoint(path)
        return checkpoint.state_dict, checkpoint.metadata.architecture, f"'{path}'", "meddinov3"
    return read_state_dict(path), None, f"'{path}'", None


def load_encoder_weights(encoder, source, *, name: str | None = None, verbose: bool = False) -> str:
    """Strictly load ``source`` into a DINOv3Encoder.

    ``source`` is a path (``.pth``/``.pt`` in any known layout, a ``.safetensors`` file in this
    project's format, a dinov3 DCP directory), a registry name, a state dict or a
    :class:`~nnunet_meddinov3.checkpoints.format.LoadedCheckpoint`. Returns the layout
    (``'meddinov3'`` for this project's format). Raises :class:`CheckpointMismatchError` listing
    every missing, unexpected or mis-shaped key and the configs that would fit, and, for files
    in this project's format, every architecture field (LayerNorm eps, RoPE settings, ...) in
    which the file's metadata and the encoder's config differ; nothing is loaded in that case.
    ``name`` is how errors call a state dict the caller read from a file (e.g. its path).
    """
    raw, recorded, name, own_layout = _read_source(source, name)
    state, layout = to_encoder_layout(raw)
    layout = own_layout or layout
    target = encoder.state_dict()

    if PATCH_EMBED_KEY in state and PATCH_EMBED_KEY in target:
        state[PATCH_EMBED_KEY] = adapt_patch_embed(state[PATCH_EMBED_KEY], target[PATCH_EMBED_KEY].shape[1])
    if layout in ("timm", "hf_transformers"):
        state = with_reference_periods(state, encoder.config)
    facts = describe_checkpoint(state)
    state = without_zero_qkv_biases(state, encoder.config)

    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                       for k in set(state) & set(target) if state[k].shape != target[k].shape)
    messages = []
    if missing or unexpected or misshaped:
        messages.append(_mismatch_message(missing, unexpected, misshaped, facts, name))
    if recorded is not None:
        diffs = architecture_differences(recorded, encoder.config, raw)
        if diffs:
            messages.append(_architecture_message(diffs, recorded, name))
    if messages:
        raise CheckpointMismatchError("\n".join(messages))
    encoder.load_state_dict(state, strict=True)
    logger.log(logging.INFO if verbose else logging.DEBUG, "loaded encoder weights from %s (layout: %s)", name, layout)
    return layout


@dataclass
class SourceCheckpoint:
    """Any supported checkpoint, read for inspection or conversion (see :func:`read_source`)."""

    path: Path
    layout: str                   # a converters.CONVERTERS name, 'dinov3_dcp' or 'meddinov3' (ours)
    raw: dict                     # as stored (for DCP: the consolidated reference-layout backbone)
    state: dict                   # encoder layout ('vit.*' keys)
    metadata: CheckpointMetadata | None = None  # for our format
    details: dict = field(default_factory=dict)


def read_source(path: str | os.PathLike) -> SourceCheckpoint:
    """Read a checkpoint of any supported layout: our format, a foreign ``.safetensors`` (timm, Hugging
    Face, bare encoder keys), a ``.pth``/``.pt``/``.bin`` pickle of tensors, or a dinov3 DCP directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.is_dir():
        raw, prefix = read_dcp_backbone(path)  # refuses a folder that is not a DCP checkpoint
        state, _ = to_encoder_layout(raw)
        return SourceCheckpoint(path, "dinov3_dcp", raw, state, details={"dcp_prefix": prefix})
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        if METADATA_KEY in header:
            checkpoint = read_checkpoint(path)
            return SourceCheckpoint(path, "meddinov3", checkpoint.state_dict, dict(checkpoint.state_dict),
                                    checkpoint.metadata)
        raw = safetensors.torch.load_file(str(path))
    else:
        raw = read_state_dict(path)
    state, layout = to_encoder_layout(raw)
    return SourceCheckpoint(path, layout, raw, state)


# --- encoders built from weights ---------------------------------------------------------------
# The encoder (nnunet_meddinov3.network) knows nothing about files; these put the two together.

def build_encoder_from_checkpoint(path: str | os.PathLike | LoadedCheckpoint, in_channels: int = 1,
                                  **overrides) -> DINOv3Encoder:
    """Rebuild the encoder from the file's metadata, then load its weights strictly.

    ``path`` may also be a checkpoint already read (and hash-checked) by
    :func:`~nnunet_meddinov3.checkpoints.format.read_checkpoint`. ``overrides`` change training-only
    settings (e.g. ``drop_path_rate``); anything that would change the numerics is refused by the
    strict load's architecture check.
    """
    checkpoint = path if isinstance(path, LoadedCheckpoint) else read_checkpoint(path)
    config = checkpoint.metadata.encoder_config()
    if overrides:
        config = config.replace(**overrides)
    encoder = DINOv3Encoder(config, in_channels=in_channels)
    load_encoder_weights(encoder, checkpoint)
    return encoder


def build_encoder(name: str | EncoderConfig = "meddinov3_vitb16", in_channels: int = 1,
                  checkpoint=None, **overrides) -> DINOv3Encoder:
    """:func:`nnunet_meddinov3.network.build_encoder` (a named config plus overrides), then, when
    ``checkpoint`` is given, a strict :func:`load_encoder_weights` of it: a path, a registry name or a
    state dict in any layout that function understands."""
    encoder = DINOv3Encoder(resolve_encoder_config(name, **overrides), in_channels=in_channels)
    if checkpoint is not None:
        load_encoder_weights(encoder, checkpoint)
    return encoder
