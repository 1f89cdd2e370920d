"""Every foreign DINOv3 checkpoint layout, converted to the encoder's own keys in one visible place.

The encoder's keys are those of :class:`~nnunet_meddinov3.network.encoder.DINOv3Encoder`
(timm ``Eva`` names under ``vit.``). Each converter takes a flat ``{key: tensor}`` dict and returns
one in that layout; :func:`to_encoder_layout` detects which converter applies
(:func:`~nnunet_meddinov3.checkpoints.keys.detect_layout`).

Layouts (name -> where such files come from):

- ``dinov3_reference``: Meta's hub ``.pth`` (``DinoVisionTransformer.state_dict()``)
- ``dinov3_training``: ``{'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}`` (MedDINOv3 release,
  dinov3 ``do_test`` eval checkpoints)
- ``dinov3_backbone_prefixed``: the same dict without the ``'teacher'`` wrapper
- ``dinov3_dcp``: dinov3's sharded torch.distributed.checkpoint directories (read by
  :func:`read_dcp_backbone`, which yields a ``dinov3_reference`` dict)
- ``timm``: timm's DINOv3 ``Eva`` state dicts (``timm/vit_*_patch16_dinov3*`` hub files)
- ``hf_transformers``: Hugging Face ``DINOv3ViTModel`` / ``DINOv3ViTBackbone`` state dicts
- ``encoder``: this project's own keys (what our safetensors format stores)
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from nnunet_meddinov3.checkpoints.keys import (  # noqa: F401  (LayoutError, detect_layout: part of this API)
    ENCODER_PREFIX,
    PERIODS_KEY,
    LayoutError,
    describe_checkpoint,
    detect_layout,
    teacher_state,
)
from nnunet_meddinov3.network.configs import ENCODER_CONFIGS, FFN_LAYERS, EncoderConfig

# Keys of the reference model that have no counterpart when fine-tuning. ``local_cls_norm`` (SAT
# ViT-L, 7B) normalises the cls token of local crops in training only: the reference's eval path,
# and so every dense feature, never uses it.
_REFERENCE_ONLY = ("mask_token", "local_cls_norm.")
# The reference's SwiGLU (silu(w1 x) * w2 x, then w3) in timm's SwiGLU names (act(fc1_g x) * fc1_x x, then fc2).
_SWIGLU_RENAMES = {".mlp.w1.": ".mlp.fc1_g.", ".mlp.w2.": ".mlp.fc1_x.", ".mlp.w3.": ".mlp.fc2."}


def from_dinov3_training(state: dict) -> dict:
    """``{'teacher': {'backbone.*': ..., 'dino_head.*': ..., 'ibot_head.*': ...}}`` (MedDINOv3 release)."""
    return from_backbone_prefixed(teacher_state(state))


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
        for theirs, ours in _SWIGLU_RENAMES.items():
            key = key.replace(theirs, ours)
        out[key] = value
    return {ENCODER_PREFIX + k: v for k, v in out.items()}


def from_timm(state: dict) -> dict:
    """timm's DINOv3 Eva state dict (``vit_*_patch16_dinov3*``); timm keeps no RoPE periods."""
    return {ENCODER_PREFIX + k: v for k, v in state.items() if not k.startswith("head.")}


# Hugging Face DINOv3ViTModel (transformers >= 4.56) -> timm Eva names, per block.
# transformers 5 nests the blocks under ``model.`` in memory but saves ``layer.N`` (hub files).
_HF_BLOCK = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
_HF_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "attention.q_proj.bias": "attn.q_bias", "attention.v_proj.bias": "attn.v_bias",
    "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2",
    "mlp.up_proj.weight": "mlp.fc1.weight", "mlp.up_proj.bias": "mlp.fc1.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight", "mlp.down_proj.bias": "mlp.fc2.bias",
}
# In a gated MLP, up_proj is the value half, not the MLP's first layer.
_HF_GATED_RENAMES = {f"mlp.{hf}.{p}": f"mlp.{ours}.{p}" for hf, ours in
                     (("gate_proj", "fc1_g"), ("up_proj", "fc1_x"), ("down_proj", "fc2")) for p in ("weight", "bias")}
_HF_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    # early transformers releases wrapped the conv in a ``proj`` submodule
    "embeddings.patch_embeddings.proj.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.proj.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_HF_DROPPED = ("embeddings.mask_token", "rope_embeddings.inv_freq")


def from_hf_transformers(state: dict) -> dict:
    """Hugging Face ``DINOv3ViTModel`` keys: separate q/k/v projections are fused into timm's ``qkv``.

    ``k_proj.bias`` (absent in released models) is dropped: adding the same vector to every key
    shifts all of a query's attention logits by one constant, which softmax ignores, so this is exact.
    HF keeps no RoPE periods (``inv_freq`` is recomputed, unrounded); the loader supplies the
    reference (bf16-rounded) periods the weights were trained with.
    """
    out, blocks = {}, {}
    for key, value in state.items():
        if key in _HF_DROPPED:
            continue
        if key in _HF_TOP_RENAMES:
            out[_HF_TOP_RENAMES[key]] = value
            continue
        m = _HF_BLOCK.match(key)
        if not m:
            raise LayoutError(f"unexpected key '{key}' in a Hugging Face DINOv3ViTModel state dict")
        blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
    for i, block in sorted(blocks.items()):
        if "mlp.gate_proj.weight" in block:  # gated MLP (S+/L+/H+/7B): act(gate_proj x) * up_proj x
            block = {_HF_GATED_RENAMES.get(name, name): value for name, value in block.items()}
        try:
            q, k, v = (block.pop(f"attention.{n}_proj.weight") for n in "qkv")
        except KeyError as e:
            raise LayoutError(f"block {i} of the Hugging Face state dict lacks {e}") from e
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v], dim=0)
        block.pop("attention.k_proj.bias", None)
        has_q, has_v = "attention.q_proj.bias" in block, "attention.v_proj.bias" in block
        if has_q != has_v:  # timm has both or neither; a zero bias is the same as none
            missing = "attention.v_proj.bias" if has_q else "attention.q_proj.bias"
            block[missing] = torch.zeros_like(q[:, 0])
        for name, value in block.items():
            if name.startswith(("mlp.fc1_g.", "mlp.fc1_x.", "mlp.fc2.")):
                out[f"blocks.{i}.{name}"] = value
                continue
            if name not in _HF_BLOCK_RENAMES:
                raise LayoutError(f"unexpected key 'layer.{i}.{name}' in a Hugging Face DINOv3ViTModel state dict")
            out[f"blocks.{i}.{_HF_BLOCK_RENAMES[name]}"] = value
    return {ENCODER_PREFIX + k: v for k, v in out.items()}


def from_encoder(state: dict) -> dict:
    return dict(state)


CONVERTERS = {
    "dinov3_training": from_dinov3_training,
    "dinov3_backbone_prefixed": from_backbone_prefixed,
    "dinov3_reference": from_dinov3_reference,
    "timm": from_timm,
    "hf_transformers": from_hf_transformers,
    "encoder": from_encoder,
}

# What each layout does not store but the reference numerics need. The hub files and their
# timm/HF ports were built with LayerNorm eps 1e-5 ('layernormbf16') and fp32 RoPE; dinov3's
# trainer (and MedDINOv3, which kept its defaults) uses nn.LayerNorm eps 1e-6 and bf16 RoPE.
# A stored ``rope_embed.periods`` buffer has the rope dtype the reference was built with.
LAYOUT_NUMERICS = {
    "dinov3_reference": {"norm_eps": 1e-5, "rope_dtype": "fp32"},
    "timm": {"norm_eps": 1e-5, "rope_dtype": "fp32"},
    "hf_transformers": {"norm_eps": 1e-5, "rope_dtype": "fp32"},
    "dinov3_training": {"norm_eps": 1e-6, "rope_dtype": "bf16"},
    "dinov3_backbone_prefixed": {"norm_eps": 1e-6, "rope_dtype": "bf16"},
    "dinov3_dcp": {"norm_eps": 1e-6, "rope_dtype": "bf16"},
}

def swiglu_config(embed_dim: int, hidden_features: int) -> dict:
    """``ffn_layer`` and ``mlp_ratio`` giving a SwiGLU layer ``hidden_features`` wide: a released
    model's where one has this width (so a 7B reads as ``swiglu64``, ratio 3), else the reference's
    ratio for plain ``swiglu`` (shapes cannot tell alignments apart that give the same width)."""
    for config in ENCODER_CONFIGS.values():
        if config.gated_ffn and (config.embed_dim, config.ffn_hidden_features) == (embed_dim, hidden_features):
            return {"ffn_layer": config.ffn_layer, "mlp_ratio": config.mlp_ratio}
    for ffn_layer in (name for name, align in FFN_LAYERS.items() if align):
        candidate = EncoderConfig(embed_dim=embed_dim, depth=1, num_heads=1, ffn_layer=ffn_layer,
                                  mlp_ratio=hidden_features * 1.5 / embed_dim)
        if candidate.ffn_hidden_features == hidden_features:
            return {"ffn_layer": ffn_layer, "mlp_ratio": candidate.mlp_ratio}
    raise LayoutError(f"no SwiGLU ratio of the reference gives a hidden width of {hidden_features} on width "
                      f"{embed_dim}; name the encoder config explicitly")


# Head counts of the released sizes, for layouts that store no periods (timm, HF).
_HEADS_BY_WIDTH = {64: 4, 384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}


def to_encoder_layout(state: dict) -> tuple[dict, str]:
    """Convert any known layout to the encoder's keys; returns (state, layout name)."""
    layout = detect_layout(state)
    converted = CONVERTERS[layout](state)
    bad = [k for k, v in converted.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LayoutError(f"checkpoint entries that are not tensors: {bad[:5]}")
    return converted, layout


def infer_encoder_config(state: dict, layout: str, **known):
    """The EncoderConfig of encoder-layout ``state`` converted from ``layout``.

    Shapes give the size, storage tokens and qkv bias; the stored RoPE periods give the head count
    and RoPE dtype; the layout gives what no tensor shows (LayerNorm eps, RoPE dtype when no
    periods are stored). ``known`` (e.g. from a Hugging Face ``config.json``) overrides all of it.
    """
    if layout not in LAYOUT_NUMERICS:
        raise LayoutError(f"'{layout}' weights carry no architecture information beyond shapes; "
                          "name the encoder config explicitly (e.g. --encoder meddinov3_vitb16)")
    facts = describe_checkpoint(state)
    if "embed_dim" not in facts or "depth" not in facts:
        raise LayoutError("cannot infer the architecture: no cls token or no blocks in the checkpoint")
    arch = dict(LAYOUT_NUMERICS[layout])
    arch.update(embed_dim=facts["embed_dim"], depth=facts["depth"], n_storage_tokens=facts["n_storage_tokens"],
                qkv_bias=any(k.endswith("attn.q_bias") for k in state),
                untie_cls_and_patch_norms=facts["untie_cls_and_patch_norms"])
    if facts.get("ffn") == "mlp":
        arch["mlp_ratio"] = facts["ffn_hidden_features"] / facts["embed_dim"]
    elif facts.get("ffn") == "swiglu":
        arch.update(swiglu_config(facts["embed_dim"], facts["ffn_hidden_features"]))
    periods = state.get(PERIODS_KEY)
    if periods is not None:
        arch["num_heads"] = facts["num_heads"]
        arch["rope_dtype"] = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(periods.dtype, arch["rope_dtype"])
    elif facts["embed_dim"] in _HEADS_BY_WIDTH:
        arch["num_heads"] = _HEADS_BY_WIDTH[facts["embed_dim"]]
    arch.update(known)
    if "num_heads" not in arch:
        raise LayoutError(f"cannot infer the head count of a {facts['embed_dim']}-wide model without stored "
                          "RoPE periods; name the encoder config explicitly")
    return EncoderConfig(**arch)


# --- dinov3's sharded checkpoints (torch.distributed.checkpoint directories) -------------------
#
# dinov3's ``save_checkpoint`` calls ``dcp.save({'iteration': i, 'model': get_model_state_dict(m),
# 'optimizer': ...})``; DCP flattens nested dicts with '.', so the stored keys are e.g.
# ``model.teacher.backbone.blocks.0.attn.qkv.weight``. Training checkpoints (``ckpt/<iter>/``) hold
# the whole SSLMetaArch: ``model.student.*``, ``model.teacher.*`` and its alias ``model.model_ema.*``
# plus optimizer state; ``eval/<iter>/sharded_teacher_checkpoint/`` holds only ``model_ema``:
# ``model.backbone.*``, ``model.dino_head.*``, ``model.ibot_head.*``.
DCP_BACKBONE_PREFIXES = (
    "model.teacher.backbone.",    # EMA teacher of a training checkpoint: what gets released
    "model.model_ema.backbone.",  # the same module under its alias
    "model.backbone.",            # sharded eval checkpoint (the teacher alone)
    "model.student.backbone.",    # multi-distillation runs keep no teacher: the student is the model
)
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_dcp_backbone(directory: str | os.PathLike, *, max_bytes_per_read: int = 256 << 20) -> tuple[dict, str]:
    """Consolidate the ViT backbone of a dinov3 DCP directory into one reference-layout dict.

    Only the backbone's tensors are read (never the optimizer, student or heads), a batch of at
    most ``max_bytes_per_read`` at a time, each straight into its final full-size tensor, so peak
    memory is the backbone itself. Returns (state, the key prefix that was used).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    if not is_dcp_checkpoint(directory):
        raise LayoutError(f"'{directory}' is not a torch.distributed.checkpoint directory (no .metadata file)")
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    prefix = next((p for p in DCP_BACKBONE_PREFIXES if any(k.startswith(p) for k in tensors)), None)
    if prefix is None:
        tops = sorted({".".join(k.split(".")[:2]) for k in tensors})
        raise LayoutError(f"DCP checkpoint '{directory}' has no DINOv3 backbone: looked for "
                          f"{', '.join(p + '*' for p in DCP_BACKBONE_PREFIXES)}; it holds {tops[:12]}")
    wanted = [(k, m) for k, m in tensors.items() if k.startswith(prefix)]
    out, batch, batch_bytes = {}, {}, 0

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            with warnings.catch_warnings():  # single-process reading is the point here, not a mistake
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(batch, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
            for key, tensor in batch.items():
                name = key[len(prefix):]
                for segment in _WRAPPER_SEGMENTS:
                    name = name.replace(segment, "")
                out[name] = tensor
        batch, batch_bytes = {}, 0

    for key, meta in wanted:
        nbytes = meta.size.numel() * torch.empty((), dtype=meta.properties.dtype).element_size()
        if batch and batch_bytes + nbytes > max_bytes_per_read:
            flush()
        batch[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        batch_bytes += nbytes
    flush()
    return out, prefix
