"""What the network is built from, as plain data: encoder configs, decoder names, LoRA targets.

The one home of these registries. They import nothing heavy (no torch, timm or numpy), so the
command line offers them as choices and ``pretrain`` validates its configs without building
anything; :mod:`~nnunet_meddinov3.network.encoder`, :mod:`~nnunet_meddinov3.network.decoders` and
:mod:`~nnunet_meddinov3.network.lora` build the modules from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PATCH_SIZE = 16  # pixels per side of a ViT patch


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
# The ViT sizes: the official layouts' names (taken before the MedDINOv3 ones join the registry below).
# The planner writes one into the plans; a trainer applies its own layout (e.g. MEDDINOV3_LAYOUT) to it.
VIT_SIZES = tuple(sorted(ENCODER_CONFIGS))

# What the MedDINOv3 CT release changes relative to the official layout (its ``vit_base(...)`` call).
MEDDINOV3_LAYOUT = dict(qkv_bias=False, norm_eps=1e-6, rope_dtype="bf16", layer_scale_init=1e-5,
                        n_storage_tokens=4)
for _size in ("tiny", "vits16", "vitb16", "vitl16"):
    ENCODER_CONFIGS[f"meddinov3_{_size}"] = ENCODER_CONFIGS[_size].replace(**MEDDINOV3_LAYOUT)
# The student of the CPU distillation config (pretrain/configs/tiny_distill.yaml): half the tiny encoder's width
# and depth, its teacher being the tiny encoder.
ENCODER_CONFIGS["meddinov3_tiny_half"] = ENCODER_CONFIGS["meddinov3_tiny"].replace(embed_dim=32, depth=2, num_heads=2)


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


# The decoders, by name (the classes are network.decoders.DECODERS, keyed by these names).
DECODER_NAMES = ("multiscale", "single", "bottleneck")

# LoRA: the layers of each block that can get adapters (``qkv``, ``proj``: attention; ``mlp``: every
# linear layer of the MLP), and the recipe's defaults.
LORA_TARGET_NAMES = ("qkv", "proj", "mlp")
DEFAULT_LORA_ALPHA = 16.0
DEFAULT_LORA_TARGETS = "qkv,proj"
