"""Light decoders from ViT patch-token maps (H/16) to full-resolution logits (H).

All three share one upsampling stack: 4 x [2x2 transposed conv, stride 2 -> channel LayerNorm ->
GELU], halving the channels each time, then a 1x1 conv to classes. They differ in what they feed it:

- ``MultiScaleAggregationDecoder``: the concatenated maps of several blocks (the paper's design;
  ViT-B: blocks 2, 5, 8, 11 -> 3072 channels);
- ``SingleScaleDecoder``: the last block only;
- ``BottleneckDecoder``: the concatenation projected back to the embedding width by a 1x1 conv,
  so the expensive high-resolution stages run 4x narrower.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map.

    One fused ``F.layer_norm`` on a channels-last view; the reference's LayerNormNd computes the
    same with a chain of elementwise ops, about twice as slow on large maps.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class UpsamplingStack(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, num_stages: int = 4):
        super().__init__()
        stages = []
        channels = in_channels
        for _ in range(num_stages):
            out = max(channels // 2, 1)
            stages.append(nn.Sequential(
                nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2),
                ChannelLayerNorm2d(out, eps=1e-6),
                nn.GELU(),
            ))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.seg_head = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg_head(self.stages(x))


class MultiScaleAggregationDecoder(nn.Module):
    def __init__(self, embed_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        self.upsample = UpsamplingStack(embed_dim * num_layers, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.upsample(torch.cat(list(features), dim=1))


class SingleScaleDecoder(nn.Module):
    def __init__(self, embed_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        self.upsample = UpsamplingStack(embed_dim, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.upsample(features[-1])


class BottleneckDecoder(nn.Module):
    def __init__(self, embed_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(embed_dim * num_layers, embed_dim, kernel_size=1),
                                     ChannelLayerNorm2d(embed_dim, eps=1e-6), nn.GELU())
        self.upsample = UpsamplingStack(embed_dim, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.upsample(self.project(torch.cat(list(features), dim=1)))


DECODERS = {
    "multiscale": MultiScaleAggregationDecoder,
    "single": SingleScaleDecoder,
    "bottleneck": BottleneckDecoder,
}
