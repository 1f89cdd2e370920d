"""Encoder (timm DINOv3 + the fidelity fixes), decoders and MedDINOv3Net."""
from nnunet_meddinov3.network.decoders import (
    DECODERS,
    BottleneckDecoder,
    ChannelLayerNorm2d,
    MultiScaleAggregationDecoder,
    SingleScaleDecoder,
)
from nnunet_meddinov3.network.encoder import (
    ENCODER_CONFIGS,
    DINOv3Encoder,
    EncoderConfig,
    build_encoder,
    default_feature_layers,
    resolve_encoder_config,
)
from nnunet_meddinov3.network.meddinov3_net import MedDINOv3Net

__all__ = [
    "DECODERS", "ENCODER_CONFIGS", "BottleneckDecoder", "ChannelLayerNorm2d", "DINOv3Encoder",
    "EncoderConfig", "MedDINOv3Net", "MultiScaleAggregationDecoder", "SingleScaleDecoder",
    "build_encoder", "default_feature_layers", "resolve_encoder_config",
]
