"""Key names of the encoder layout, layout detection and the architecture facts tensor shapes show.

A leaf of the weights flow: it imports nothing of this project, so converters, the file format and
the loader can all depend on it without depending on each other. Only key names and shapes are
looked at here, never tensor values (except whether q/v biases are all zero).
"""
from __future__ import annotations

import re

ENCODER_PREFIX = "vit."
PATCH_EMBED_KEY = f"{ENCODER_PREFIX}patch_embed.proj.weight"
PERIODS_KEY = f"{ENCODER_PREFIX}rope.periods"
QKV_BIAS_SUFFIXES = ("attn.q_bias", "attn.v_bias")

# Human names of the layouts, for error messages.
LAYOUT_NAMES = {
    "hf_transformers": "Hugging Face transformers DINOv3ViTModel weights",
    "timm": "timm DINOv3 (Eva) weights",
    "encoder": "this project's encoder keys without the 'meddinov3' header (a bare save_file of encoder.state_dict()?)",
    "dinov3_reference": "Meta's DINOv3 reference layout (DinoVisionTransformer.state_dict())",
    "dinov3_backbone_prefixed": "a dinov3 training teacher/student dict",
}


class LayoutError(ValueError):
    """The checkpoint is not in any DINOv3 layout this project knows."""


def _what_it_looks_like(keys: list[str]) -> str:
    """A guess at a non-DINOv3 dict, so the error says more than 'unknown'."""
    if any(k in ("model", "state_dict", "module", "network_weights") for k in keys):
        nested = [k for k in keys if k in ("model", "state_dict", "module", "network_weights")]
        return (f"the weights seem to be nested under {nested} (a training checkpoint of some other "
                "program); extract that dict first")
    if any(k.startswith(("layer1.", "conv1.")) for k in keys) or any(".downsample." in k for k in keys):
        return "this looks like a ResNet/CNN state dict, not a vision transformer"
    if any(k.startswith(("encoder.layer.", "vit.embeddings.")) for k in keys):
        return "this looks like a Hugging Face ViT/DINOv2 model, not DINOv3"
    if any("pos_embed" in k for k in keys) and not any("rope" in k for k in keys):
        return "this looks like a ViT with absolute position embeddings (e.g. DINOv2), not a DINOv3 RoPE ViT"
    return ""


def teacher_state(state: dict) -> dict:
    """The ``'teacher'`` dict of a dinov3 training checkpoint (``{'teacher': {'backbone.*', heads}}``),
    else ``state`` itself."""
    teacher = state.get("teacher")
    return teacher if isinstance(teacher, dict) else state


def detect_layout(state: dict) -> str:
    """Name the layout of a (possibly nested) checkpoint dict (only key names are looked at)."""
    if teacher_state(state) is not state:
        return "dinov3_training"  # MedDINOv3 release / dinov3 trainer: {'teacher': {'backbone.*', heads}}
    keys = list(state)
    if any(k.startswith(ENCODER_PREFIX) for k in keys) and f"{ENCODER_PREFIX}cls_token" in state:
        return "encoder"
    if "storage_tokens" in state or "rope_embed.periods" in state:
        return "dinov3_reference"  # Meta's hub .pth: plain state dict of DinoVisionTransformer
    if "reg_token" in state and any(k.endswith("gamma_1") for k in keys):
        return "timm"
    if "embeddings.cls_token" in state or "embeddings.patch_embeddings.weight" in state:
        return "hf_transformers"
    if any(k.startswith("backbone.") for k in keys):
        return "dinov3_backbone_prefixed"
    guess = _what_it_looks_like(keys)
    raise LayoutError(
        "not a DINOv3 checkpoint: found none of the keys 'storage_tokens', 'rope_embed.periods' "
        "(Meta's layout), 'teacher' (MedDINOv3/dinov3 training), 'reg_token' (timm), "
        f"'embeddings.cls_token' (Hugging Face). First keys: {keys[:8]}" + (f". {guess}" if guess else ""))


def has_nonzero_qkv_bias(state: dict) -> bool:
    return any(bool(v.abs().max() > 0) for k, v in state.items() if k.endswith(QKV_BIAS_SUFFIXES))


def describe_checkpoint(state: dict) -> dict:
    """Architecture facts readable from encoder-layout tensor shapes alone."""
    facts = {}
    if f"{ENCODER_PREFIX}cls_token" in state:
        facts["embed_dim"] = state[f"{ENCODER_PREFIX}cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(ENCODER_PREFIX)}blocks\.(\d+)\.", k))}
    if blocks:
        facts["depth"] = max(blocks) + 1
    reg = state.get(f"{ENCODER_PREFIX}reg_token")
    facts["n_storage_tokens"] = 0 if reg is None else reg.shape[1]
    facts["qkv_bias"] = has_nonzero_qkv_bias(state)
    for ffn, key in (("mlp", "mlp.fc1.weight"), ("swiglu", "mlp.fc1_g.weight")):
        first = state.get(f"{ENCODER_PREFIX}blocks.0.{key}")
        if first is not None:
            facts["ffn"], facts["ffn_hidden_features"] = ffn, first.shape[0]
    facts["untie_cls_and_patch_norms"] = f"{ENCODER_PREFIX}cls_norm.weight" in state
    if PERIODS_KEY in state and "embed_dim" in facts:
        head_dim = 4 * state[PERIODS_KEY].numel()
        facts["num_heads"] = facts["embed_dim"] // head_dim
    return facts
