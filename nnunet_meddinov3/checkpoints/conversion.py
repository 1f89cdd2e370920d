"""Convert any supported checkpoint (file or dinov3 DCP directory) into this project's format.

The one-way flow: :mod:`~nnunet_meddinov3.checkpoints.loading` reads the source in whatever layout
it is (:mod:`~nnunet_meddinov3.checkpoints.converters` renames its keys), the architecture is named,
recorded or inferred, the tensors are strictly loaded into an encoder of that architecture, and
:mod:`~nnunet_meddinov3.checkpoints.format` writes and re-verifies the file.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from nnunet_meddinov3.checkpoints.converters import infer_encoder_config
from nnunet_meddinov3.checkpoints.format import (
    DINOV3_CITATION,
    DINOV3_LICENCE,
    CheckpointMetadata,
    file_sha256,
    read_checkpoint,
    write_checkpoint,
)
from nnunet_meddinov3.checkpoints.keys import PATCH_EMBED_KEY
from nnunet_meddinov3.checkpoints.loading import (
    load_encoder_weights,
    read_source,
    with_reference_periods,
    without_zero_qkv_biases,
)
from nnunet_meddinov3.data.intensity import INTENSITY_PRESETS
from nnunet_meddinov3.network.configs import resolve_encoder_config
from nnunet_meddinov3.network.encoder import DINOv3Encoder


def hf_config_hints(path: Path) -> dict:
    """Architecture facts from a Hugging Face ``config.json`` next to the weights, if there is one."""
    config_file = path.parent / "config.json"
    if path.is_dir() or not config_file.is_file():
        return {}
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
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
    src = Path(src)
    source = read_source(src)
    state = dict(source.state)
    previous = source.metadata
    if encoder is not None:
        config = resolve_encoder_config(encoder)
    elif previous is not None:
        config = previous.encoder_config()
    else:
        config = infer_encoder_config(state, source.layout, **hf_config_hints(src))

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
    kernel = state.get(PATCH_EMBED_KEY)
    with torch.device("meta"):
        encoder = DINOv3Encoder(config, in_channels=int(kernel.shape[1]) if kernel is not None else 3)
    with warnings.catch_warnings():  # copying into meta tensors is the intended no-op
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        load_encoder_weights(encoder, state)
