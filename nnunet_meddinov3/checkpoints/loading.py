"""Strict loading of encoder weights from any known layout, with errors that say what would fit."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from nnunet_meddinov3.checkpoints.converters import ENCODER_PREFIX, to_encoder_layout

PATCH_EMBED_KEY = f"{ENCODER_PREFIX}patch_embed.proj.weight"
PERIODS_KEY = f"{ENCODER_PREFIX}rope.periods"


class CheckpointMismatchError(RuntimeError):
    """Checkpoint and encoder disagree; the message lists every difference and what would fit."""


def read_state_dict(path: str | os.PathLike) -> dict:
    """Read a checkpoint file without executing pickled code (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from nnunet_meddinov3.checkpoints.format import read_checkpoint
        return read_checkpoint(path).state_dict
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load '{path}': it is a pickle holding more than tensors and plain "
            f"containers ({str(e).splitlines()[0]}). Only weight files are accepted.") from e
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
    q_biases = [v for k, v in state.items() if k.endswith("attn.q_bias") or k.endswith("attn.v_bias")]
    facts["qkv_bias"] = bool(q_biases) and any(bool(v.abs().max() > 0) for v in q_biases)
    if PERIODS_KEY in state and "embed_dim" in facts:
        head_dim = 4 * state[PERIODS_KEY].numel()
        facts["num_heads"] = facts["embed_dim"] // head_dim
    return facts


def fitting_configs(facts: dict) -> list[str]:
    from nnunet_meddinov3.network.encoder import ENCODER_CONFIGS
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


def load_encoder_weights(encoder, source, *, verbose: bool = False) -> str:
    """Strictly load ``source`` (path, registry name or state dict) into a DINOv3Encoder.

    Returns the detected layout. Raises :class:`CheckpointMismatchError` listing every missing,
    unexpected or mis-shaped key and the configs that would fit; nothing is loaded in that case.
    """
    if isinstance(source, dict):
        raw, name = source, "the given state dict"
    else:
        from nnunet_meddinov3.checkpoints.registry import resolve_weights
        path = resolve_weights(source)
        raw, name = read_state_dict(path), f"'{path}'"
    state, layout = to_encoder_layout(raw)
    target = encoder.state_dict()

    if PATCH_EMBED_KEY in state and PATCH_EMBED_KEY in target:
        state[PATCH_EMBED_KEY] = adapt_patch_embed(state[PATCH_EMBED_KEY], target[PATCH_EMBED_KEY].shape[1])
    if PERIODS_KEY not in state and layout == "timm":
        state[PERIODS_KEY] = target[PERIODS_KEY]  # timm never stores periods; ours are the reference's
    facts = describe_checkpoint(state)
    if not encoder.config.qkv_bias and not facts["qkv_bias"]:
        # Official distilled B/L/H files carry all-zero qkv biases: dropping them is exact.
        state = {k: v for k, v in state.items() if not k.endswith(("attn.q_bias", "attn.v_bias"))}

    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                       for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(_mismatch_message(missing, unexpected, misshaped, facts, name))
    encoder.load_state_dict(state, strict=True)
    if verbose:
        print(f"loaded encoder weights from {name} (layout: {layout})")
    return layout
