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

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn

from nnunet_meddinov3.network.configs import FFN_LAYERS, EncoderConfig, resolve_encoder_config
from nnunet_meddinov3.network.timm_adapter import (
    Eva,
    EvaBlock,
    LayerNorm,
    PeriodsRotaryEmbedding,
    attention_branch,
    check_ffn_width,
    embed_tokens,
    ffn_kwargs,
    mlp_branch,
    replace_block_class,
    replace_qk_norm,
    replace_rope,
    rotary_embedding,
    run_blocks,
    token_norm,
    transformer_blocks,
)


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
        x = torch.index_add(x, 0, keep, attention_branch(self, x[keep], rope), alpha=b / subset)
        keep = torch.randperm(b, device=x.device)[:subset]
        return torch.index_add(x, 0, keep, mlp_branch(self, x[keep]), alpha=b / subset)


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
        for block in transformer_blocks(self.vit):
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
        rotary_embedding(self.vit).set_coordinate_rescaling(factor)

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
        return self.token_dict(self.final_norm(run_blocks(vit, tokens, rope)))

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference's final norm of (B, 1 + R + P, D) tokens: ``norm`` for all of them, or with
        untied norms ``cls_norm`` for the cls and storage tokens and ``norm`` for the patches."""
        norm = token_norm(self.vit)
        if not self.config.untie_cls_and_patch_norms:
            return norm(tokens)
        n_prefix = 1 + self.config.n_storage_tokens
        return torch.cat([self.vit.cls_norm(tokens[:, :n_prefix]), norm(tokens[:, n_prefix:])], dim=1)

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
