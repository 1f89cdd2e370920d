"""Cross-slice context for running the 2D DINOv3 encoder on 3D patches (:mod:`.volumetric`).

Each module takes the patch tokens of all slices of a batch of volumes folded into one batch,
(B*S, N, D) with the slices of a volume adjacent, and returns them with information mixed in from
the other slices of the same volume. Every module is a residual branch whose output projection is
zero-initialised, so at initialisation it is the identity and the network computes exactly the
released 2D encoder's features on each slice (TimeSformer's start state, arXiv 2102.05095); the
branch learns how much depth context to add.

- :class:`SliceAttention`: pre-norm multi-head attention across the slices at each patch position
  (TimeSformer's divided attention, (B*S, N, D) -> (B*N, S, D)), with 1D RoPE over the slice index.
- :class:`DepthConv`: a (3, 1, 1) Conv3d across neighbouring slices at each patch position.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTEXT_KINDS = ("slice_attention", "depth_conv", "none")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def slice_rope_table(num_slices: int, head_dim: int, base: float, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos), each (S, head_dim), of a 1D RoPE over integer slice indices, in the rotate-half
    layout DINOv3 uses in-plane. Integer indices (not coordinates normalised to the patch, as
    DINOv3 does in-plane) make q.k depend on the slice offset in voxels, which is what a fixed
    3d_fullres spacing makes meaningful, whatever S the plan or a sliding-window tile has."""
    half = head_dim // 2
    frequencies = base ** (-torch.arange(half, dtype=torch.float32, device=device) / half)
    angles = torch.arange(num_slices, dtype=torch.float32, device=device)[:, None] * frequencies[None, :]
    angles = angles.tile(2)
    return angles.sin(), angles.cos()


def _by_position(tokens: torch.Tensor, num_slices: int) -> torch.Tensor:
    """(B*S, N, D), slices of a volume adjacent -> (B*N, S, D): one sequence of slices per position."""
    bs, n, d = tokens.shape
    return tokens.view(bs // num_slices, num_slices, n, d).transpose(1, 2).reshape(-1, num_slices, d)


def _by_slice(tokens: torch.Tensor, num_positions: int) -> torch.Tensor:
    """The inverse of :func:`_by_position`: (B*N, S, D) -> (B*S, N, D)."""
    bn, s, d = tokens.shape
    return tokens.view(bn // num_positions, num_positions, s, d).transpose(1, 2).reshape(-1, num_positions, d)


class SliceAttention(nn.Module):
    """Pre-norm attention across slices at each patch position, added residually.

    The depth position enters only q and k (1D RoPE over the slice index, see
    :func:`slice_rope_table`), not the residual stream, so the tokens the next 2D block sees differ
    from the 2D ones only by what the attention adds. ``proj`` starts at zero: the identity.
    """

    def __init__(self, dim: int, num_heads: int, norm_eps: float = 1e-6, rope_base: float = 100.0):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"slice attention needs an even head width: {dim} channels do not split into "
                             f"{num_heads} heads of even width; choose other context_heads")
        self.num_heads = num_heads
        self.rope_base = rope_base
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.qkv.weight, std=0.02)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, patch_tokens: torch.Tensor, num_slices: int) -> torch.Tensor:
        num_positions, dim = patch_tokens.shape[1:]
        sequences = _by_position(self.norm(patch_tokens), num_slices)
        head_dim = dim // self.num_heads
        qkv = self.qkv(sequences).view(-1, num_slices, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B*N, heads, S, head_dim)
        sin, cos = (t.to(q.dtype) for t in slice_rope_table(num_slices, head_dim, self.rope_base, q.device))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, num_slices, dim)
        update = _by_slice(self.proj(mixed), num_positions)
        return patch_tokens + update.to(patch_tokens.dtype)


class DepthConv(nn.Module):
    """A residual (3, 1, 1) Conv3d across neighbouring slices at each patch position (zero-padded at
    the patch's first and last slice). A full convolution rather than a depthwise + pointwise pair,
    so that the zero-initialised branch gets a gradient on the first step (a pair would pass none to
    its depthwise half until the pointwise half has moved)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, patch_tokens: torch.Tensor, num_slices: int) -> torch.Tensor:
        bs, n, d = patch_tokens.shape
        volume = patch_tokens.view(bs // num_slices, num_slices, n, d).permute(0, 3, 1, 2).unsqueeze(-1)
        update = self.conv(volume).squeeze(-1).permute(0, 2, 3, 1).reshape(bs, n, d)
        return patch_tokens + update.to(patch_tokens.dtype)


class SliceContext(nn.Module):
    """One context module after each block the decoder taps, ``after_block[str(block index)]``.

    ``in_residual_stream``: slice attention acts on the encoder's residual stream, before the tap's
    final norm, so later blocks see it; the depth convolution acts on the final-normed tapped
    features only, on the decoder side.
    """

    def __init__(self, kind: str, embed_dim: int, block_indices: Sequence[int], num_heads: int,
                 norm_eps: float = 1e-6):
        super().__init__()
        if kind == "slice_attention":
            def make() -> nn.Module:
                return SliceAttention(embed_dim, num_heads, norm_eps)
        elif kind == "depth_conv":
            def make() -> nn.Module:
                return DepthConv(embed_dim)
        else:
            raise ValueError(f"no context module for context '{kind}'; choose one of {CONTEXT_KINDS}")
        self.kind = kind
        self.after_block = nn.ModuleDict({str(i): make() for i in block_indices})

    @property
    def in_residual_stream(self) -> bool:
        return self.kind == "slice_attention"

    def output_projections(self) -> list[nn.Module]:
        """The zero-initialised layers that make each module start as the identity."""
        return [m.proj if isinstance(m, SliceAttention) else m.conv for m in self.after_block.values()]

    def forward(self, block_index: int, patch_tokens: torch.Tensor, num_slices: int) -> torch.Tensor:
        return self.after_block[str(block_index)](patch_tokens, num_slices)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
