"""Light decoders from ViT patch tokens (H/16) to full-resolution logits (H).

All three share one upsampling stack: 4 x [2x2 transposed conv, stride 2 -> channel LayerNorm ->
GELU], halving the channels each time, then a 1x1 conv to classes. They differ in what they feed it:

- ``MultiScaleAggregationDecoder``: the concatenated tokens of several blocks (the paper's design;
  ViT-B: blocks 2, 5, 8, 11 -> 3072 channels);
- ``SingleScaleDecoder``: the last block only;
- ``BottleneckDecoder``: the concatenation projected back to the embedding width by a 1x1 conv,
  so the expensive high-resolution stages run 4x narrower.

How it runs (the parameters and state-dict keys are those of the plain conv modules):
a 2x2 stride-2 transposed conv maps each input pixel to its own 2x2 output block, so it is one
matrix product per pixel (C_in -> 4 x C_out) followed by a depth-to-space shuffle; LayerNorm,
GELU and the 1x1 head are per pixel too. The decoder therefore never needs the pixels in spatial
order: it runs on a (B, pixels, C) token matrix, appending each stage's 2x2 sub-position to the
pixel index, and puts the pixels in place once, on the ``num_classes``-channel logits. Every stage
is a single large GEMM plus a LayerNorm over contiguous channels, instead of a transposed
convolution and LayerNorm on NCHW maps (on a 2-core CPU at 448 px the decoder's training step
drops from 6.7 s to 5.0 s; on GPUs the GEMMs are what tensor cores run best). On CPU the stack runs
as one autograd node that reuses its large buffers between training steps (``upsampling_cpu.py``:
5.3 s -> 4.7 s more, the same arithmetic).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_meddinov3.network.configs import DECODER_NAMES
from nnunet_meddinov3.network.upsampling_cpu import (
    ReusableBuffers,
    UpsamplingStackFunction,
    transposed_conv_as_gemm_weight,
    upsampling_stack_params,
)


class ChannelLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (or over the last dim of tokens).

    One fused ``F.layer_norm`` on a channels-last view; the reference's LayerNormNd computes the
    same with a chain of elementwise ops, about twice as slow on large maps.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype in (torch.float16, torch.bfloat16):
            # Autocast would run layer_norm in fp32 and hand fp32 to the GELU and the next GEMM: twice
            # the memory traffic on the decoder's largest tensors. torch's kernels accumulate in fp32
            # whatever the input dtype, so stay in the GEMM's dtype.
            with torch.autocast(tokens.device.type, enabled=False):
                return F.layer_norm(tokens, self.normalized_shape, self.weight.to(tokens.dtype),
                                    self.bias.to(tokens.dtype), self.eps)
        return F.layer_norm(tokens, self.normalized_shape, self.weight, self.bias, self.eps)


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class UpsamplingStage(nn.Sequential):
    """2x2 stride-2 transposed conv -> channel LayerNorm -> GELU.

    ``forward`` runs the modules on an NCHW map; ``forward_tokens`` computes the same as a GEMM on
    (B, N, C_in) tokens and returns (B, 4N, C_out) tokens, sub-position (di, dj) of token n at
    index 4n + 2di + dj.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
                         ChannelLayerNorm2d(out_channels, eps=1e-6),
                         nn.GELU())

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self
        c_out = conv.weight.shape[1]
        y = F.linear(tokens, transposed_conv_as_gemm_weight(conv.weight), conv.bias.repeat(4))
        y = y.reshape(tokens.shape[0], -1, c_out)
        return act(norm.forward_tokens(y))


class UpsamplingStack(nn.Module):
    """The stages, then the 1x1 head, then the pixels put in place.

    For a training step on CPU (fp32/fp64, no autocast, not under ``torch.compile``) it runs as one
    autograd node that reuses its large buffers from step to step
    (:mod:`~nnunet_meddinov3.network.upsampling_cpu`): the same arithmetic, without the page faults of
    fresh 300 MB tensors. ``cpu_workspace = False`` on an instance runs the plain path everywhere.
    """

    cpu_workspace = True

    def __init__(self, in_channels: int, num_classes: int, num_stages: int = 4):
        super().__init__()
        self._workspace = ReusableBuffers()
        stages = []
        channels = in_channels
        for _ in range(num_stages):
            out = max(channels // 2, 1)
            stages.append(UpsamplingStage(channels, out))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.seg_head = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(_map_to_tokens(x), tuple(x.shape[-2:]))

    def forward_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, C) tokens in row-major order of an h x w grid -> (B, classes, h*2^n, w*2^n) logits."""
        if self._runs_cpu_path(tokens):
            return self._to_image(self._cpu_logits(tokens), grid)
        for stage in self.stages:
            tokens = stage.forward_tokens(tokens)
        head = self.seg_head
        logits = F.linear(tokens, head.weight.flatten(1), head.bias)
        return self._to_image(logits, grid)

    def _runs_cpu_path(self, tokens: torch.Tensor) -> bool:
        """A training step on CPU in fp32/fp64, outside autocast and torch.compile."""
        return (self.cpu_workspace and tokens.device.type == "cpu"
                and tokens.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and torch.is_grad_enabled()
                and (tokens.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _cpu_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        params = upsampling_stack_params(self.stages, self.seg_head)
        eps = self.stages[0][1].eps  # every stage's LayerNorm is built with the same eps
        self._workspace.start(tokens)
        return UpsamplingStackFunction.apply(tokens, self._workspace, eps, *params)

    def _to_image(self, logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # Token index = ((row, col), (di_1, dj_1), ..., (di_n, dj_n)); output row = row * 2^n + di_1 * 2^(n-1)
        # + ... + di_n, so the pixels go in place by one permutation of those axes. The classes go first in
        # a plain transpose: the permutation then moves runs of pixels, not single values (3x faster on CPU).
        n = len(self.stages)
        b, _, k = logits.shape
        h, w = grid
        x = logits.transpose(1, 2).contiguous().view(b, k, h, w, *([2, 2] * n))
        di = [4 + 2 * s for s in range(n)]
        dj = [5 + 2 * s for s in range(n)]
        x = x.permute(0, 1, 2, *di, 3, *dj)
        return x.reshape(b, k, h * 2 ** n, w * 2 ** n)


class _TokenDecoder(nn.Module):
    """Decoders take the encoder's patch tokens as (B, h*w, C) plus the grid (h, w); ``forward`` also
    accepts NCHW maps, for callers holding those."""

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        grid = tuple(features[0].shape[-2:])
        return self.forward_tokens([_map_to_tokens(f) for f in features], grid)

    def forward_tokens(self, tokens: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


class MultiScaleAggregationDecoder(_TokenDecoder):
    def __init__(self, embed_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        self.upsample = UpsamplingStack(embed_dim * num_layers, num_classes)

    def forward_tokens(self, tokens, grid):
        return self.upsample.forward_tokens(torch.cat(list(tokens), dim=-1), grid)


class SingleScaleDecoder(_TokenDecoder):
    def __init__(self, embed_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        self.upsample = UpsamplingStack(embed_dim, num_classes)

    def forward_tokens(self, tokens, grid):
        return self.upsample.forward_tokens(tokens[-1], grid)


class TokenProjection(nn.Sequential):
    """1x1 conv -> channel LayerNorm -> GELU, run per token."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=1),
                         ChannelLayerNorm2d(out_channels, eps=1e-6),
                         nn.GELU())

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self
        return act(norm.forward_tokens(F.linear(tokens, conv.weight.flatten(1), conv.bias)))


class BottleneckDecoder(_TokenDecoder):
    def __init__(self, embed_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        self.project = TokenProjection(embed_dim * num_layers, embed_dim)
        self.upsample = UpsamplingStack(embed_dim, num_classes)

    def forward_tokens(self, tokens, grid):
        return self.upsample.forward_tokens(self.project.forward_tokens(torch.cat(list(tokens), dim=-1)), grid)


# The classes of the names in configs.DECODER_NAMES, in that order (the names live there, so that the
# command line offers them without importing torch).
DECODERS = dict(zip(DECODER_NAMES, (MultiScaleAggregationDecoder, SingleScaleDecoder, BottleneckDecoder),
                    strict=True))
