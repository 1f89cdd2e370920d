"""Encoder (timm DINOv3 + the fidelity fixes), decoders and MedDINOv3Net.

``configs`` holds what they are built from as plain data (encoder configs, decoder names, LoRA targets).
Names are imported lazily (PEP 562, a documented exception to top-level imports), so importing
``nnunet_meddinov3.network.configs`` (the command line's choices, pretraining's config checks) does
not pull in torch or timm.
"""
from __future__ import annotations

from nnunet_meddinov3.lazy_exports import lazy_exports

_EXPORTS = {
    "configs": ("ENCODER_CONFIGS", "EncoderConfig", "default_feature_layers", "resolve_encoder_config"),
    "decoders": ("DECODERS", "BottleneckDecoder", "ChannelLayerNorm2d", "MultiScaleAggregationDecoder",
                 "SingleScaleDecoder"),
    "encoder": ("DINOv3Encoder", "build_encoder"),
    "meddinov3_net": ("MedDINOv3Net",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
