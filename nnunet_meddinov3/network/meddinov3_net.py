"""MedDINOv3Net: DINOv3 encoder + light transposed-conv decoder, built from hyperparameters only."""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_meddinov3.network.configs import default_feature_layers, resolve_encoder_config
from nnunet_meddinov3.network.decoders import DECODERS
from nnunet_meddinov3.network.encoder import DINOv3Encoder

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None, "none": None, "fp32": None}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Without it torch
    emulates bf16 and runs slower than fp32; with it, ~4.5x the fp32 matmul rate on a 2-core Xeon."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(probe() for probe in probes if probe is not None)
    except RuntimeError:  # private probes; an unknown CPU is not a native one
        return False


class MedDINOv3Net(nn.Module):
    """2D segmentation network of the MedDINOv3 paper (arXiv 2509.02379).

    Accepts any H, W: the input is zero-padded to a multiple of 16 and the logits cropped back.
    There is no deep supervision; the output is one (B, num_classes, H, W) float32 tensor.

    On CUDA the network runs in ``autocast_dtype`` (bf16 by default) whatever autocast the caller
    set up, because nnU-Net's train/predict paths autocast to fp16, where a ViT's activations can
    overflow; the logits are returned in fp32. On CPU it runs fp32, as nnU-Net does, unless
    ``cpu_autocast``: then in ``autocast_dtype`` too, the precision the network has on a GPU (on a
    2-core CPU with native bf16, ViT-B 448 px, batch 2: training 0.21 -> 0.55 img/s, inference
    0.56 -> 1.40 img/s by ``meddinov3 bench --cpu-bf16``).
    """

    def __init__(self, input_channels: int, num_classes: int, encoder: str | dict = "meddinov3_vitb16",
                 decoder: str = "multiscale", feature_layers: Sequence[int] | None = None,
                 drop_path_rate: float = 0.0, encoder_overrides: dict | None = None,
                 autocast_dtype: str | None = "bf16", grad_checkpointing: bool = False,
                 cpu_autocast: bool = False, deep_supervision: bool = False):
        super().__init__()
        if deep_supervision:
            raise ValueError("MedDINOv3Net has no deep supervision. Train it with a MedDINOv3 trainer "
                             "(e.g. -tr nnUNetTrainerMedDINOv3), which disables it.")
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder '{decoder}'; choose one of {sorted(DECODERS)}")
        if autocast_dtype not in _AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {sorted(map(str, _AUTOCAST_DTYPES))}")
        config = resolve_encoder_config(encoder, drop_path_rate=drop_path_rate, **(encoder_overrides or {}))
        self.encoder = DINOv3Encoder(config, in_channels=input_channels)
        if feature_layers is None:
            feature_layers = (config.depth - 1,) if decoder == "single" else default_feature_layers(config.depth)
        self.feature_layers = tuple(int(i) for i in feature_layers)
        if not all(0 <= i < config.depth for i in self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} out of range for depth {config.depth}")
        if len(set(self.feature_layers)) != len(self.feature_layers):  # timm returns a repeated block once
            raise ValueError(f"feature_layers {self.feature_layers} repeat a block; name each block once")
        self.decoder = DECODERS[decoder](config.embed_dim, len(self.feature_layers), num_classes)
        self.autocast_dtype = _AUTOCAST_DTYPES[autocast_dtype]
        self.num_classes = num_classes
        if grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.cpu_autocast = cpu_autocast and self.autocast_dtype is not None
        self._cpu_bf16_checked = False

    def _precision(self, x: torch.Tensor):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        if x.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        if x.device.type == "cpu" and self.cpu_autocast:
            if not self._cpu_bf16_checked:  # once, and only where it runs on a CPU
                self._cpu_bf16_checked = True
                if self.autocast_dtype == torch.bfloat16 and not cpu_has_native_bf16():
                    warnings.warn("bf16 on CPU was asked for (MEDDINOV3_CPU_BF16), but this CPU has no native "
                                  "bf16 (AVX512-BF16 or AMX): torch emulates it, usually slower than fp32")
            return torch.autocast("cpu", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.encoder.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        with self._precision(x):
            tokens = self.encoder.intermediate_tokens(x, self.feature_layers)
            grid = (x.shape[-2] // p, x.shape[-1] // p)
            logits = self.decoder.forward_tokens(tokens, grid)
        return logits[..., :h, :w].float()


# How nnU-Net plans refer to this class (``architecture.network_class_name``, resolved by import).
NETWORK_CLASS_NAME = f"{MedDINOv3Net.__module__}.{MedDINOv3Net.__qualname__}"
