"""Weights flow: public file or pretrain export -> converter -> one format -> encoder."""
from nnunet_meddinov3.checkpoints.converters import LayoutError, detect_layout, to_encoder_layout
from nnunet_meddinov3.checkpoints.loading import (
    CheckpointMismatchError,
    adapt_patch_embed,
    describe_checkpoint,
    load_encoder_weights,
    read_state_dict,
)
from nnunet_meddinov3.checkpoints.registry import cache_dir, registry, resolve_weights

__all__ = [
    "CheckpointMismatchError", "LayoutError", "adapt_patch_embed", "cache_dir", "describe_checkpoint",
    "detect_layout", "load_encoder_weights", "read_state_dict", "registry", "resolve_weights",
    "to_encoder_layout",
]
