"""DINOv3 ViT encoder built on timm's Eva models, with the fixes needed to match Meta's reference.

timm's DINOv3 port matches the reference ``DinoVisionTransformer`` exactly only when:

1. the RoPE periods are the checkpoint's (bf16-rounded) values, not timm's recomputed fp32 ones;
2. the LayerNorm eps is the one the weights were trained with (1e-5 official, 1e-6 MedDINOv3);
3. intermediate outputs pass through the final norm (``get_intermediate_layers(norm=True)``).

MedDINOv3 additionally computes RoPE in bf16; ``rope_dtype="bf16"`` reproduces that bit for bit.
Everything here is built from hyperparameters only; weights are loaded by
:mod:`nnunet_meddinov3.checkpoints`. timm internals are used only through
:mod:`nnunet_meddinov3.network.timm_adapter`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm
from timm.models.eva import Eva, EvaBlock
from torch.utils.checkpoint import checkpoint

from nnunet_meddinov3.network.timm_adapter import (
    PeriodsRotaryEmbedding,
    check_ffn_width,
    embed_tokens,
    ffn_kwargs,
    replace_block_class,
    replace_qk_norm,
    replace_rope,
)

PATCH_SIZE = 16


# The reference's feed-forward layers (``ffn_layer``) -> the width its hidden size is rounded up to
# (0: a plain GELU MLP). A SwiGLU layer of ratio r on width D has hidden size int(int(D * r) * 2 / 3)
# rounded up to that multiple: 4D for S+/L+/H+ (r = 6), 2D for 7B (r = 3).
FFN_LAYERS = {"mlp": 0, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}

# Fields added after checkpoint format 1: ``to_dict`` leaves them out at their defaults, so the
# metadata (and its hash) of every encoder that could be written before stays byte for byte the same.
_LATER_FIELDS = {"ffn_layer": "mlp", "untie_cls_and_patch_norms": False}


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild a DINOv3 ViT/16 (the reference's constructor arguments).

    ``mlp_ratio`` is the reference's ``ffn_ratio`` and ``ffn_layer`` its FFN name (see FFN_LAYERS);
    ``untie_cls_and_patch_norms`` gives the cls and storage tokens a final norm of their own
    (``cls_norm``). The reference's other untied norm, ``local_cls_norm`` (SAT ViT-L, 7B), only
    ever sees local crops in training, so an encoder for dense features has no use for it.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"
    untie_cls_and_patch_norms: bool = False
    n_storage_tokens: int = 4
    qkv_bias: bool = True
    layer_scale_init: float = 1e-5
    norm_eps: float = 1e-5
    rope_base: float = 100.0
    rope_normalize_coords: str = "separate"
    rope_dtype: str = "fp32"  # "fp32" or "bf16" (MedDINOv3 release)
    patch_size: int = PATCH_SIZE
    drop_path_rate: float = 0.0

    def replace(self, **overrides) -> "EncoderConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown encoder option(s) {sorted(unknown)}; "
                            f"valid: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """All fields, but those added after checkpoint format 1 only where they differ from their
        default (see ``_LATER_FIELDS``); ``EncoderConfig(**d)`` restores the config either way."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def gated_ffn(self) -> bool:
        return FFN_LAYERS[self.ffn_layer] > 0

    @property
    def ffn_hidden_features(self) -> int:
        """The reference's hidden width of the feed-forward layer of each block."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        align = FFN_LAYERS[self.ffn_layer]
        if not align:
            return hidden
        hidden = int(hidden * 2 / 3)
        return hidden + (-hidden % align)


# Official DINOv3 layouts, by Meta's hub names without ``dinov3_`` (hub/backbones.py: qkv bias
# present, LayerNorm eps 1e-5, RoPE fp32, 4 storage tokens). The 7B has no qkv bias; its untied
# global/local cls norm, like the SAT ViT-L's, is training-only (see EncoderConfig).
ENCODER_CONFIGS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(embed_dim=64, depth=4, num_heads=4),
    "vits16": EncoderConfig(embed_dim=384, depth=12, num_heads=6),
    "vits16plus": EncoderConfig(embed_dim=384, depth=12, num_heads=6, mlp_ratio=6.0, ffn_layer="swiglu"),
    "vitb16": EncoderConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl16": EncoderConfig(embed_dim=1024, depth=24, num_heads=16),
    "vitl16plus": EncoderConfig(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=6.0, ffn_layer="swiglu"),
    "vith16plus": EncoderConfig(embed_dim=1280, depth=32, num_heads=20, mlp_ratio=6.0, ffn_layer="swiglu"),
    "vit7b16": EncoderConfig(embed_dim=4096, depth=40, num_heads=32, mlp_ratio=3.0, ffn_layer="swiglu64",
                             qkv_bias=False),
}

# What the MedDINOv3 CT release changes relative to the official layout (its ``vit_base(...)`` call).
MEDDINOV3_LAYOUT = dict(qkv_bias=False, norm_eps=1e-6, rope_dtype="bf16", layer_scale_init=1e-5,
                        n_storage_tokens=4)
for _size in ("tiny", "vits16", "vitb16", "vitl16"):
    ENCODER_CONFIGS[f"meddinov3_{_size}"] = ENCODER_CONFIGS[_size].replace(**MEDDINOV3_LAYOUT)


def resolve_encoder_config(name_or_config: str | EncoderConfig | dict, **overrides) -> EncoderConfig:
    if isinstance(name_or_config, EncoderConfig):
        config = name_or_config
    elif isinstance(name_or_config, dict):
        config = EncoderConfig(**name_or_config)
    elif name_or_config in ENCODER_CONFIGS:
        config = ENCODER_CONFIGS[name_or_config]
    else:
        raise KeyError(f"unknown encoder '{name_or_config}'; known: {', '.join(sorted(ENCODER_CONFIGS))}")
    return config.replace(**overrides) if overrides else config


def default_feature_layers(depth: int, n: int = 4) -> tuple[int, ...]:
    """Evenly spaced blocks ending at the last one: (2, 5, 8, 11) for depth 12, as in the paper; every
    block where the depth is below ``n`` (depth 2: (0, 1)), since timm returns a block repeated in
    ``indices`` only once and the decoder's width is set by the number of layers."""
    # round() halves to even: without the clamp round(0.5) - 1 would be block -1 for depth 2
    return tuple(dict.fromkeys(max(round((i + 1) * depth / n) - 1, 0) for i in range(n)))


def reference_rope_periods(config: EncoderConfig) -> torch.Tensor:
    """The reference's period formula, rounded through bf16 as every released checkpoint stores it."""
    n = config.head_dim // 4
    exponents = 2.0 * torch.arange(n, dtype=torch.float32) / (config.head_dim // 2)
    return (config.rope_base ** exponents).to(torch.bfloat16).float()


ROPE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ReferenceRotaryEmbedding(PeriodsRotaryEmbedding):
    """timm's DINOv3 RoPE, but with the reference's numerics.

    The periods are a persistent buffer, so fine-tuned nnU-Net checkpoints carry the exact values
    the weights were trained with and inference needs no other file. Coordinates are computed in
    the RoPE dtype from the start, as the reference does (timm computes them in fp32 and casts),
    which matters when that dtype is bf16. ``set_coordinate_rescaling`` is DINOv3's RoPE box
    augmentation (Meta's later-stage configs use 2). The implementation is in the timm adapter.
    """


class RoundToDtype(nn.Module):
    """Stands in for the (identity) q/k norm so q and k enter the rotation in the RoPE dtype.

    The reference casts q and k (all tokens) to the RoPE dtype, rotates in that dtype and casts
    back; timm's attention casts back itself (``type_as(v)``), so rounding here is all it takes.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


class BatchSubsetStochasticDepthBlock(EvaBlock):
    """timm's EvaBlock with the reference DINOv3 block's stochastic depth.

    The reference (and so the MedDINOv3 recipe) gives every block the same drop rate r and, in
    training, computes each residual branch only for a random subset of ``max(int(B * (1 - r)), 1)``
    samples, adding it back scaled by B / subset (``torch.index_add``). timm instead draws a
    per-sample mask, decays r linearly over depth and still computes every sample. Besides matching
    the recipe, the subset form skips the dropped samples' FLOPs: at batch 2 and r = 0.2 each branch
    runs on one image.
    """

    sample_drop_ratio: float = 0.0

    def _attention_branch(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        y = self.attn(self.norm1(x), rope=rope)
        return y if self.gamma_1 is None else self.gamma_1 * y

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm2(x))
        return y if self.gamma_2 is None else self.gamma_2 * y

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                **kwargs):
        # kwargs: what newer timm blocks take besides (is_causal since 1.0.26), passed on unchanged
        if not self.training or self.sample_drop_ratio <= 0.0:
            return super().forward(x, rope=rope, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None or kwargs.get("is_causal") or (rope is not None and rope.dim() > 2):
            raise NotImplementedError("batch-subset stochastic depth takes no attention mask and one RoPE table "
                                      "for the whole batch")
        b = x.shape[0]
        subset = max(int(b * (1 - self.sample_drop_ratio)), 1)
        keep = torch.randperm(b, device=x.device)[:subset]
        x = torch.index_add(x, 0, keep, self._attention_branch(x[keep], rope), alpha=b / subset)
        keep = torch.randperm(b, device=x.device)[:subset]
        return torch.index_add(x, 0, keep, self._mlp_branch(x[keep]), alpha=b / subset)


class DINOv3Encoder(nn.Module):
    """A DINOv3 ViT/16 (timm ``Eva``) returning dense patch features of chosen blocks."""

    def __init__(self, config: EncoderConfig, in_channels: int = 1):
        super().__init__()
        if config.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer '{config.ffn_layer}'; known: {', '.join(FFN_LAYERS)}")
        self.config = config
        self.in_channels = in_channels
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.vit = Eva(
            img_size=224,
            patch_size=config.patch_size,
            in_chans=in_channels,
            num_classes=0,
            global_pool="token",
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            **ffn_kwargs(config.embed_dim, config.mlp_ratio, config.ffn_hidden_features,
                         FFN_LAYERS[config.ffn_layer]),
            qkv_bias=config.qkv_bias,
            init_values=config.layer_scale_init,
            drop_path_rate=0.0,  # stochastic depth is the reference's, set on the blocks below
            norm_layer=partial(LayerNorm, eps=config.norm_eps),
            num_reg_tokens=config.n_storage_tokens,
            use_abs_pos_emb=False,
            use_rot_pos_emb=True,
            rope_type="dinov3",
            rope_temperature=config.rope_base,
            rope_rotate_half=True,
            use_fc_norm=False,
            dynamic_img_size=True,
        )
        check_ffn_width(self.vit, config.ffn_hidden_features)
        # Same parameters and keys; only forward differs (timm builds its blocks itself).
        replace_block_class(self.vit, BatchSubsetStochasticDepthBlock)
        for block in self.vit.blocks:
            block.sample_drop_ratio = config.drop_path_rate
        rope_dtype = ROPE_DTYPES[config.rope_dtype]
        replace_rope(self.vit, ReferenceRotaryEmbedding(
            dim=config.head_dim, periods=reference_rope_periods(config), dtype=rope_dtype,
            temperature=config.rope_base, normalize_coords=config.rope_normalize_coords, rotate_half=True))
        if rope_dtype != torch.float32:
            replace_qk_norm(self.vit, lambda: RoundToDtype(rope_dtype))
        if config.untie_cls_and_patch_norms:
            # under vit. so its key is the reference's 'cls_norm.*' with our prefix
            self.vit.cls_norm = LayerNorm(config.embed_dim, eps=config.norm_eps)

    @property
    def depth(self) -> int:
        return self.config.depth

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def set_rope_coordinate_rescaling(self, factor: float | None) -> None:
        """See :meth:`ReferenceRotaryEmbedding.set_coordinate_rescaling`; a pretraining option, not part
        of the encoder's identity (checkpoints do not record it, fine-tuning does not use it)."""
        self.vit.rope.set_coordinate_rescaling(factor)

    def intermediate_features(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Normalised patch tokens of the given blocks (0-based) as (B, C, H/16, W/16) maps.

        Equals the reference ``get_intermediate_layers(x, n=layers, reshape=True, norm=True)``.
        H and W must be multiples of the patch size.
        """
        return self._intermediates(x, layers, "NCHW")

    def intermediate_tokens(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """The same as :meth:`intermediate_features` as (B, H/16 * W/16, C) tokens, row-major."""
        return self._intermediates(x, layers, "NLC")

    def _intermediates(self, x: torch.Tensor, layers: Sequence[int], output_fmt: str) -> list[torch.Tensor]:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size "
                             f"{self.patch_size}; pad it first (MedDINOv3Net does this for you)")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"encoder expects {self.in_channels} input channel(s), got {x.shape[1]}")
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {self.depth}-block encoder")
        return self.vit.forward_intermediates(
            x, indices=list(layers), norm=True, output_fmt=output_fmt, intermediates_only=True,
            stop_early=True)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reference ``forward_features``: normalised cls, storage and patch tokens.

        x (B, C, H, W) -> ``x_norm_clstoken`` (B, D), ``x_storage_tokens`` (B, R, D),
        ``x_norm_patchtokens`` (B, H/16 * W/16, D). With ``masks`` (B, H/16 * W/16) bool, the
        embeddings of the masked patches are replaced by ``mask_token`` (D,) before the blocks, as
        iBOT pretraining needs; without, this is timm's ``forward_features``, op for op.
        """
        vit = self.vit
        hook = None
        if masks is not None:
            if mask_token is None:
                raise ValueError("masks need a mask_token to put in place of the masked patches")

            def hook(patches: torch.Tensor) -> torch.Tensor:
                grid_mask = masks.view(*patches.shape[:3], 1)
                return torch.where(grid_mask, mask_token.to(patches.dtype).view(1, 1, 1, -1), patches)

        tokens, rope = embed_tokens(vit, x, hook)
        for block in vit.blocks:
            if vit.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, rope=rope, use_reentrant=False)
            else:
                tokens = block(tokens, rope=rope)
        return self.token_dict(self.final_norm(tokens))

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference's final norm of (B, 1 + R + P, D) tokens: ``norm`` for all of them, or with
        untied norms ``cls_norm`` for the cls and storage tokens and ``norm`` for the patches."""
        if not self.config.untie_cls_and_patch_norms:
            return self.vit.norm(tokens)
        n_prefix = 1 + self.config.n_storage_tokens
        return torch.cat([self.vit.cls_norm(tokens[:, :n_prefix]), self.vit.norm(tokens[:, n_prefix:])], dim=1)

    def token_dict(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference's token dict from normalised (B, 1 + R + P, D) tokens; built here only."""
        n_prefix = 1 + self.config.n_storage_tokens
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_storage_tokens": tokens[:, 1:n_prefix],
            "x_norm_patchtokens": tokens[:, n_prefix:],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)["x_norm_clstoken"]


def build_encoder(name: str | EncoderConfig = "meddinov3_vitb16", in_channels: int = 1,
                  **overrides) -> DINOv3Encoder:
    """Build a DINOv3 encoder from a named config (see ``ENCODER_CONFIGS``) plus overrides, with
    freshly initialised weights. The encoder knows nothing about files: to build one with weights use
    :func:`nnunet_meddinov3.checkpoints.build_encoder` (``checkpoint=``) or
    :func:`~nnunet_meddinov3.checkpoints.build_encoder_from_checkpoint`."""
    return DINOv3Encoder(resolve_encoder_config(name, **overrides), in_channels=in_channels)
