"""Every foreign DINOv3 checkpoint layout, converted to the encoder's own keys in one visible place.

The encoder's keys are those of :class:`~nnunet_meddinov3.network.encoder.DINOv3Encoder`
(timm ``Eva`` names under ``vit.``). Each converter takes a flat ``{key: tensor}`` dict and returns
one in that layout; :func:`to_encoder_layout` detects which converter applies.
"""
from __future__ import annotations

import re

import torch

ENCODER_PREFIX = "vit."

# Keys of the reference model that have no counterpart when fine-tuning.
_REFERENCE_ONLY = ("mask_token", "local_cls_norm.")


class LayoutError(ValueError):
    """The checkpoint is not in any DINOv3 layout this project knows."""


def detect_layout(state: dict) -> str:
    """Name the layout of a (possibly nested) checkpoint dict."""
    if "teacher" in state and isinstance(state["teacher"], dict):
        return "dinov3_training"  # MedDINOv3 release / dinov3 trainer: {'teacher': {'backbone.*', heads}}
    keys = list(state)
    if any(k.startswith(ENCODER_PREFIX) for k in keys) and f"{ENCODER_PREFIX}cls_token" in state:
        return "encoder"
    if "storage_tokens" in state or "rope_embed.periods" in state:
        return "dinov3_reference"  # Meta's hub .pth: plain state dict of DinoVisionTransformer
    if "reg_token" in state and any(k.endswith("gamma_1") for k in keys):
        return "timm"
    if any(k.startswith("backbone.") for k in keys):
        return "dinov3_backbone_prefixed"
    raise LayoutError(
        "not a DINOv3 checkpoint: found none of the keys 'storage_tokens', 'rope_embed.periods' "
        f"(Meta's layout), 'teacher' (MedDINOv3/dinov3 training), 'reg_token' (timm). First keys: {keys[:8]}")


def from_dinov3_training(state: dict) -> dict:
    """``{'teacher': {'backbone.*': ..., 'dino_head.*': ..., 'ibot_head.*': ...}}`` (MedDINOv3 release)."""
    return from_backbone_prefixed(state["teacher"])


def from_backbone_prefixed(state: dict) -> dict:
    """A teacher/student dict: keep ``backbone.*`` (the ViT), drop the DINO/iBOT heads."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise LayoutError("training checkpoint has no 'backbone.*' keys")
    return from_dinov3_reference(backbone)


def from_dinov3_reference(state: dict) -> dict:
    """Meta's ``DinoVisionTransformer.state_dict()`` (official hub files and training backbones)."""
    out = {}
    for key, value in state.items():
        if key.startswith(_REFERENCE_ONLY) or key.endswith(".bias_mask"):
            continue  # pretraining-only tokens/norms; bias_mask only zeroes the k bias, dropped below
        if key.endswith("attn.qkv.bias"):
            # The reference multiplies the k third by a zero mask, so dropping it is exact.
            q_bias, _, v_bias = value.chunk(3, dim=0)
            out[key.replace("qkv.bias", "q_bias")] = q_bias
            out[key.replace("qkv.bias", "v_bias")] = v_bias
            continue
        key = key.replace("rope_embed.periods", "rope.periods")
        key = key.replace("storage_tokens", "reg_token")
        key = re.sub(r"\.ls1\.gamma$", ".gamma_1", key)
        key = re.sub(r"\.ls2\.gamma$", ".gamma_2", key)
        out[key] = value
    return {ENCODER_PREFIX + k: v for k, v in out.items()}


def from_timm(state: dict) -> dict:
    """timm's DINOv3 Eva state dict (``vit_*_patch16_dinov3*``); timm keeps no RoPE periods."""
    return {ENCODER_PREFIX + k: v for k, v in state.items() if not k.startswith("head.")}


def from_encoder(state: dict) -> dict:
    return dict(state)


CONVERTERS = {
    "dinov3_training": from_dinov3_training,
    "dinov3_backbone_prefixed": from_backbone_prefixed,
    "dinov3_reference": from_dinov3_reference,
    "timm": from_timm,
    "encoder": from_encoder,
}


def to_encoder_layout(state: dict) -> tuple[dict, str]:
    """Convert any known layout to the encoder's keys; returns (state, layout name)."""
    layout = detect_layout(state)
    converted = CONVERTERS[layout](state)
    bad = [k for k, v in converted.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LayoutError(f"checkpoint entries that are not tensors: {bad[:5]}")
    return converted, layout
