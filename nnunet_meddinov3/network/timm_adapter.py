"""Every use of timm internals, in one place, so a timm upgrade is checked here and nowhere else.

The encoder is timm's ``Eva`` (public constructor, public ``forward_intermediates`` /
``forward_features``). Matching Meta's DINOv3 reference and running iBOT's masked forward needs a
few things timm does not offer publicly; each one is a function or class below, and
tests/test_timm_adapter.py checks the assumptions it makes against the installed timm:

- :func:`embed_tokens`: ``Eva._pos_embed`` (prefix tokens + the RoPE table of the grid), so a
  caller can change the patch embeddings (iBOT's mask token) before the blocks;
- :func:`replace_block_class`: ``block.__class__`` of the ``EvaBlock`` s timm built (same
  parameters and keys, another ``forward``);
- :func:`replace_qk_norm`: the (identity) ``attn.q_norm`` / ``attn.k_norm`` of each block;
- :func:`replace_rope`: ``Eva.rope``;
- :class:`PeriodsRotaryEmbedding`: ``RotaryEmbeddingDinoV3._create_embed`` overridden, its
  ``_apply_coord_augs`` and its augmentation attributes (``shift_coords``, ``jitter_coords``,
  ``rescale_coords``, ``aug_active``).

:data:`TESTED_TIMM` is the range these were tested with; ``pyproject.toml`` pins timm to it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from timm.models.eva import Eva, EvaBlock

TESTED_TIMM = ">=1.0.20,<1.0.26"  # keep in step with pyproject.toml


def embed_tokens(vit: Eva, x: torch.Tensor,
                 patch_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first half of ``Eva.forward_features``: patch embedding, ``patch_hook`` (B, h, w, D) ->
    (B, h, w, D) if given, then the cls/storage tokens and the RoPE table for the grid
    (``_pos_embed``), then ``norm_pre``. Returns (tokens (B, 1 + R + h*w, D), rope table).
    The encoder is built with ``dynamic_img_size``, so patch embeddings keep their grid shape."""
    tokens = vit.patch_embed(x)
    if patch_hook is not None:
        tokens = patch_hook(tokens)
    tokens, rope = vit._pos_embed(tokens)
    return vit.norm_pre(tokens), rope


def replace_block_class(vit: Eva, cls: type[EvaBlock]) -> None:
    """Give every block of ``vit`` the class ``cls``, a subclass of ``EvaBlock`` that only changes
    ``forward``: timm builds its blocks itself, and this keeps their parameters and keys."""
    if not issubclass(cls, EvaBlock):
        raise TypeError(f"{cls.__name__} must subclass timm's EvaBlock")
    for block in vit.blocks:
        if type(block) is not EvaBlock and not isinstance(block, cls):
            raise TypeError(f"expected timm EvaBlock blocks, found {type(block).__name__}")
        block.__class__ = cls


def replace_qk_norm(vit: Eva, make_norm: Callable[[], nn.Module]) -> None:
    """Put ``make_norm()`` in place of each block's q and k norm (identity in DINOv3 models), which
    timm's attention applies to q and k right before the rotation."""
    for block in vit.blocks:
        block.attn.q_norm = make_norm()
        block.attn.k_norm = make_norm()


def replace_rope(vit: Eva, rope: RotaryEmbeddingDinoV3) -> None:
    """Use ``rope`` as the model's rotary embedding (``_pos_embed`` asks it for each grid's table)."""
    vit.rope = rope


class PeriodsRotaryEmbedding(RotaryEmbeddingDinoV3):
    """timm's DINOv3 RoPE with given periods (a persistent buffer) and coordinates computed in the
    periods' dtype from the start.

    Only ``normalize_coords="separate"`` is reimplemented (DINOv3's setting); other modes fall back
    to timm. Training-mode coordinate augmentations are timm's (``_apply_coord_augs``).
    """

    def __init__(self, dim: int, periods: torch.Tensor, dtype: torch.dtype, **kwargs):
        super().__init__(dim=dim, **kwargs)
        self.register_buffer("periods", periods.to(dtype), persistent=True)

    def set_coordinate_rescaling(self, factor: float | None) -> None:
        """In training mode, scale all coordinates by one factor drawn log-uniformly from
        [1/factor, factor] per forward pass (None turns it off); evaluation mode never augments."""
        if factor is not None and not factor >= 1:
            raise ValueError(f"RoPE coordinate rescaling factor must be >= 1 or None, got {factor}")
        self.rescale_coords = factor
        self.aug_active = any(a is not None for a in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def _create_embed(self, feat_shape, no_aug: bool = False) -> torch.Tensor:
        if self.normalize_coords != "separate":
            return super()._create_embed(feat_shape, no_aug=no_aug)
        H, W = feat_shape
        dd = dict(device=self.periods.device, dtype=self.periods.dtype)
        coords_h = torch.arange(0.5, H, **dd) / H
        coords_w = torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if not no_aug:
            coords = self._apply_coord_augs(coords)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1).tile(2)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
