"""Every use of timm internals, in one place, so a timm upgrade is checked here and nowhere else.

The encoder is timm's ``Eva`` (public constructor, public ``forward_intermediates`` /
``forward_features``), built from the classes imported here (``Eva``, ``EvaBlock``, ``LayerNorm``),
so timm is imported nowhere else. Matching Meta's DINOv3 reference and running iBOT's masked forward
needs a few things timm does not offer publicly; each one is a function or class below, and
tests/test_timm_adapter.py checks the assumptions it makes against the installed timm:

- :func:`embed_tokens`: ``Eva._pos_embed`` (prefix tokens + the RoPE table of the grid), so a
  caller can change the patch embeddings (iBOT's mask token) before the blocks;
- :func:`run_blocks`, :func:`token_norm`: the rest of ``Eva.forward_features`` (``Eva.blocks``, its
  ``grad_checkpointing`` flag, ``Eva.norm``), after :func:`embed_tokens`;
- :func:`transformer_blocks`: ``Eva.blocks``;
- :func:`attention_branch`, :func:`mlp_branch`: an ``EvaBlock``'s residual branches (``norm1``,
  ``attn``, ``gamma_1``; ``norm2``, ``mlp``, ``gamma_2``), for a block class that runs them itself;
- :func:`replace_block_class`: ``block.__class__`` of the ``EvaBlock`` s timm built (same
  parameters and keys, another ``forward``);
- :func:`replace_qk_norm`: the (identity) ``attn.q_norm`` / ``attn.k_norm`` of each block;
- :func:`replace_rope`, :func:`rotary_embedding`: ``Eva.rope``;
- :func:`route_qkv_through_module`: ``EvaAttention.qkv_bias_separate``, so the fused qkv projection
  goes through the ``qkv`` module (and a LoRA wrapper of it) when there is a q bias;
- :class:`PeriodsRotaryEmbedding`: ``RotaryEmbeddingDinoV3._create_embed`` overridden, and the
  hooks through which timm would recompute its periods (``_apply``, ``reset_parameters``,
  ``init_non_persistent_buffers``) turned off for ours;
- :func:`ffn_kwargs`: ``Eva``'s ``mlp_ratio`` / ``swiglu_mlp`` / ``swiglu_align_to``, which decide the
  feed-forward class (``Mlp``, or ``SwiGLU`` with separate ``fc1_g`` / ``fc1_x``) and its width.

:data:`TESTED_TIMM` is the range these were tested with; ``pyproject.toml`` pins timm to it, CI runs
the encoder tests at both ends (.ci/run), and importing this module with a timm outside it warns.
What changed inside the range: 1.0.26 gave ``EvaBlock.forward`` an ``is_causal`` argument (our block
passes on what it does not use); 1.0.31 made the coordinate augmentations a module function and
recomputes a below-fp32 ``periods`` buffer on every ``.to()`` (we do our own augmentation, and keep
our periods).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

with warnings.catch_warnings():
    # timm < 1.0.25 declares a torch.jit.interface (models/hrnet.py) that torch >= 2.14 warns about at
    # import, on every command; nnU-Net 2.8.1 (dynamic-network-architectures 0.4.4: timm < 1.0.23)
    # makes a fresh install take such a timm, so the warning is silenced here, where timm is imported
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.*", category=FutureWarning)
    import timm
    from timm.layers import LayerNorm  # noqa: F401 - the encoder's norm layer, imported from here
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
    from timm.models.eva import Eva, EvaBlock

# 1.0.21: the first that builds on the meta device (1.0.20 added the DINOv3 Eva models, but its
# drop-path schedule calls .item() there). 1.0.31: the newest on the
# package index when last tested. nnU-Net 2.8.1 caps a fresh install at 1.0.22 (see above).
OLDEST_TIMM, NEWEST_TIMM = "1.0.21", "1.0.31"
TESTED_TIMM = f">={OLDEST_TIMM},<={NEWEST_TIMM}"  # keep in step with pyproject.toml


def _release(version: str) -> tuple[int, ...]:
    """(1, 0, 31) from '1.0.31', '1.0.31.dev0' or '1.0.31+local': the release part only."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def timm_in_tested_range(version: str | None = None) -> bool:
    release = _release(timm.__version__ if version is None else version)
    return _release(OLDEST_TIMM) <= release <= _release(NEWEST_TIMM)


if not timm_in_tested_range():
    warnings.warn(f"nnunet-meddinov3 was tested with timm {TESTED_TIMM}, not {timm.__version__}: the encoder uses "
                  "a few timm internals (nnunet_meddinov3/network/timm_adapter.py) and may fail or differ from "
                  f"Meta's reference. Install a tested one: pip install 'timm{TESTED_TIMM}'", RuntimeWarning,
                  stacklevel=2)


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


def recomputes_in_backward(vit: Eva) -> bool:
    """Whether blocks run now are recomputed in the backward pass: ``vit.set_grad_checkpointing()``
    turned that on, and gradients are being recorded."""
    return vit.grad_checkpointing and torch.is_grad_enabled()


def run_checkpointed(vit: Eva, function, *args, **kwargs):
    """``function(*args, **kwargs)``, recomputed in backward as :func:`recomputes_in_backward` says (for the
    blocks, and for what runs between them, like the 3D network's slice context)."""
    if recomputes_in_backward(vit):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


def run_block(vit: Eva, block: EvaBlock, tokens: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """One block of ``Eva.forward_features``, checkpointed as :func:`recomputes_in_backward` says."""
    return run_checkpointed(vit, block, tokens, rope=rope)


def run_blocks(vit: Eva, tokens: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """The blocks of ``Eva.forward_features`` on :func:`embed_tokens`' output."""
    for block in vit.blocks:
        tokens = run_block(vit, block, tokens, rope)
    return tokens


def token_norm(vit: Eva) -> nn.Module:
    """``Eva.norm``, the final norm of all tokens (the encoder builds ``Eva`` without ``fc_norm``)."""
    return vit.norm


def transformer_blocks(vit: Eva) -> list[EvaBlock]:
    """The blocks of ``vit``, in order."""
    return list(vit.blocks)


def attention_branch(block: EvaBlock, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """The attention residual branch of ``block`` without its drop path: ``gamma_1 * attn(norm1(x))``
    (no factor without layer scale)."""
    y = block.attn(block.norm1(x), rope=rope)
    return y if block.gamma_1 is None else block.gamma_1 * y


def mlp_branch(block: EvaBlock, x: torch.Tensor) -> torch.Tensor:
    """The feed-forward residual branch of ``block`` without its drop path: ``gamma_2 * mlp(norm2(x))``."""
    y = block.mlp(block.norm2(x))
    return y if block.gamma_2 is None else block.gamma_2 * y


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


def rotary_embedding(vit: Eva) -> RotaryEmbeddingDinoV3:
    """The model's rotary embedding (the encoder's own, once :func:`replace_rope` put it there)."""
    return vit.rope


def route_qkv_through_module(vit: Eva) -> None:
    """Make every block's attention call its ``qkv`` module. With a q bias (official DINOv3 weights)
    timm's ``EvaAttention`` computes ``F.linear(x, qkv.weight, bias)``, which skips a wrapped ``qkv``
    (a LoRA adapter would be ignored); ``qkv_bias_separate`` makes it ``qkv(x) + bias`` instead, the
    same sum up to rounding."""
    for block in vit.blocks:
        if not hasattr(block.attn, "qkv_bias_separate"):
            raise TypeError(f"timm's {type(block.attn).__name__} has no qkv_bias_separate: the qkv projection "
                            f"cannot be routed through a wrapped module with this timm version")
        block.attn.qkv_bias_separate = True


def ffn_kwargs(embed_dim: int, mlp_ratio: float, hidden_features: int, align_to: int) -> dict:
    """``Eva`` arguments for the reference's feed-forward layer: timm's ``Mlp`` (``fc1``, ``fc2``) of
    ratio ``mlp_ratio`` when ``align_to`` is 0 (timm's ``int(dim * ratio)`` is the reference's), else
    its ``SwiGLU`` (``fc1_g``, ``fc1_x``, ``fc2``) exactly ``hidden_features`` wide.

    For SwiGLU timm takes ``int(embed_dim * mlp_ratio)`` and rounds it up to ``swiglu_align_to``; an
    aligned ``hidden_features`` survives both even where the float ratio lands a hair below it. A
    non-zero alignment is also what makes timm use separate gate and value projections (not ``GluMlp``).
    """
    if not align_to:
        return dict(mlp_ratio=mlp_ratio)
    if hidden_features % align_to:
        raise ValueError(f"SwiGLU hidden width {hidden_features} is not a multiple of {align_to}")
    return dict(mlp_ratio=hidden_features / embed_dim, swiglu_mlp=True, swiglu_align_to=align_to)


def check_ffn_width(vit: Eva, hidden_features: int) -> None:
    """The feed-forward layers timm built have the hidden width asked for."""
    mlp = vit.blocks[0].mlp
    built = (mlp.fc1_g if hasattr(mlp, "fc1_g") else mlp.fc1).out_features
    if built != hidden_features:
        raise RuntimeError(f"timm {timm.__version__} built a feed-forward layer {built} wide instead of "
                           f"{hidden_features}; see nnunet_meddinov3/network/timm_adapter.py")


class PeriodsRotaryEmbedding(RotaryEmbeddingDinoV3):
    """timm's DINOv3 RoPE with given periods (a persistent buffer) and coordinates computed in the
    periods' dtype from the start.

    Only ``normalize_coords="separate"`` is reimplemented (DINOv3's setting); other modes fall back
    to timm. The training-mode coordinate augmentations are the reference's (shift, then per-axis
    jitter, then one rescale, each drawn log-uniformly where multiplicative), in its order of
    random draws, as timm draws them too.
    """

    def __init__(self, dim: int, periods: torch.Tensor, dtype: torch.dtype, shift_coords: float | None = None,
                 jitter_coords: float | None = None, rescale_coords: float | None = None, **kwargs):
        super().__init__(dim=dim, **kwargs)
        self.register_buffer("periods", periods.to(dtype), persistent=True)
        self.shift_coords, self.jitter_coords = shift_coords, jitter_coords
        self.set_coordinate_rescaling(rescale_coords)

    # The periods are data (the checkpoint's, bf16-rounded, possibly stored in bf16), not something
    # to recompute: timm >= 1.0.31 rebuilds a below-fp32 periods buffer from the formula on every
    # ``.to()``, and its reset hooks refill it from the formula.
    def _apply(self, fn, *args, **kwargs):
        return nn.Module._apply(self, fn, *args, **kwargs)

    def reset_parameters(self) -> None:
        pass

    def init_non_persistent_buffers(self) -> None:
        pass

    def set_coordinate_rescaling(self, factor: float | None) -> None:
        """In training mode, scale all coordinates by one factor drawn log-uniformly from
        [1/factor, factor] per forward pass (None turns it off); evaluation mode never augments."""
        if factor is not None and not factor >= 1:
            raise ValueError(f"RoPE coordinate rescaling factor must be >= 1 or None, got {factor}")
        self.rescale_coords = factor
        self.aug_active = any(a is not None for a in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def augment_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """(HW, 2) coordinates in [-1, 1], moved by the training-mode augmentations that are set."""
        if not self.training or not self.aug_active:
            return coords
        dd = dict(device=coords.device, dtype=coords.dtype)
        if self.shift_coords is not None:
            coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)[None, :]
        if self.jitter_coords is not None:
            log_jitter = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, **dd).uniform_(-log_jitter, log_jitter).exp()[None, :]
        if self.rescale_coords is not None:
            log_rescale = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-log_rescale, log_rescale).exp()
        return coords

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
            coords = self.augment_coords(coords)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1).tile(2)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
