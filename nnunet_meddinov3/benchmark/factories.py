"""The networks, losses and optimisers, one per kind of :class:`~nnunet_meddinov3.benchmark.configs.BenchConfig`.

The nnU-Net baseline comes whole from nnU-Net (:mod:`~nnunet_meddinov3.benchmark.baseline`); the loss
of every network is nnU-Net's (``nnUNetTrainer._build_loss``; one output without deep supervision,
as ``nnUNetTrainerNoDeepSupervision`` and our trainer build it); MedDINOv3Net gets our trainer's
optimiser, the reference its trainer's.
"""
from __future__ import annotations

import contextlib

import torch

from nnunet_meddinov3.benchmark.baseline import NNUNetParts
from nnunet_meddinov3.benchmark.configs import BenchConfig
from nnunet_meddinov3.benchmark.reference import (
    REFERENCE_ADAMW_BETAS,
    REFERENCE_DECODERS,
    REFERENCE_PATCH_SIZE,
    REFERENCE_VIT_KWARGS,
    import_reference,
    reference_parameter_groups,
)
from nnunet_meddinov3.network import MedDINOv3Net
from nnunet_meddinov3.network.configs import default_feature_layers, resolve_encoder_config
from nnunet_meddinov3.network.volumetric import MedDINOv3Net3D
from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training.optim import build_adamw, parameter_groups


def build_meddinov3_network(config: BenchConfig) -> MedDINOv3Net:
    """MedDINOv3Net, or on a 3D patch MedDINOv3Net3D with the configuration's cross-slice context."""
    network_class, volumetric = (MedDINOv3Net3D, {"context": config.context}) if config.is_volumetric \
        else (MedDINOv3Net, {})
    return network_class(config.input_channels, config.num_classes, encoder=config.encoder, decoder=config.decoder,
                         drop_path_rate=recipe.DROP_PATH_RATE,
                         autocast_dtype="bf16" if config.dtype == "bf16" or config.runs_cpu_bf16 else None,
                         grad_checkpointing=config.grad_checkpointing, cpu_autocast=config.runs_cpu_bf16,
                         **volumetric)


def build_nnunet_network(config: BenchConfig, parts: NNUNetParts) -> torch.nn.Module:
    """The network as nnU-Net's trainer builds it (deep supervision on, nnU-Net's init)."""
    return parts.build_network(config.input_channels, config.num_classes)


def build_reference_network(config: BenchConfig):
    """The network meddinov3_base_primus_multiscale_Trainer builds (random weights: the checkpoint it
    loads does not change the cost), with E/D/H from our encoder registry."""
    if config.decoder not in REFERENCE_DECODERS:
        raise ValueError(f"the MedDINOv3 reference has no '{config.decoder}' decoder; it has "
                         f"{', '.join(sorted(REFERENCE_DECODERS))}")
    if config.input_channels != 1:
        raise ValueError(f"the MedDINOv3 reference takes 1 input channel (its Primus networks assert it), "
                         f"not {config.input_channels}")
    if not config.reference_repo:
        raise ValueError("a reference configuration needs reference_repo")
    classes = import_reference(config.reference_repo)
    encoder = resolve_encoder_config(config.encoder)
    if encoder.patch_size != REFERENCE_PATCH_SIZE:
        raise ValueError(f"the MedDINOv3 reference uses {REFERENCE_PATCH_SIZE}-pixel patches, encoder "
                         f"'{config.encoder}' has {encoder.patch_size}")
    vit = classes["DinoVisionTransformer"](embed_dim=encoder.embed_dim, depth=encoder.depth,
                                           num_heads=encoder.num_heads, **REFERENCE_VIT_KWARGS)
    vit.init_weights()
    common = dict(embed_dim=encoder.embed_dim, patch_embed_size=REFERENCE_PATCH_SIZE,
                  num_classes=config.num_classes, dino_encoder=vit)
    if config.decoder == "multiscale":
        return classes["Primus_Multiscale"](**common,
                                            interaction_indices=list(default_feature_layers(encoder.depth)))
    return classes["Primus"](**common)


def build_network(config: BenchConfig, parts: NNUNetParts) -> torch.nn.Module:
    if config.is_baseline:
        return build_nnunet_network(config, parts)
    if config.is_reference:
        if config.is_volumetric:
            raise ValueError("the MedDINOv3 reference has no 3D network")
        return build_reference_network(config)
    return build_meddinov3_network(config)


def build_optimizer(model, config: BenchConfig, parts: NNUNetParts):
    if config.is_baseline:
        return parts.build_optimizer(model)  # nnU-Net's SGD (Nesterov, momentum 0.99)
    if config.is_reference:
        return torch.optim.AdamW(reference_parameter_groups(model), betas=REFERENCE_ADAMW_BETAS)
    # nnUNetTrainerMedDINOv3's optimiser: its recipe's LRs and weight decay, fused AdamW
    return build_adamw(parameter_groups(model, weight_decay=recipe.WEIGHT_DECAY, encoder_lr=recipe.ENCODER_LR,
                                        decoder_lr=recipe.DECODER_LR))


class CompiledBlocks:
    """torch.compile of each ViT block (regional compilation: one graph reused by all blocks).

    ``eager()`` puts the original blocks back for a while, for FLOP counting.
    """

    def __init__(self, vit):
        self.blocks = vit.blocks
        self.originals = list(vit.blocks)
        for i, block in enumerate(self.originals):
            self.blocks[i] = torch.compile(block)

    @contextlib.contextmanager
    def eager(self):
        compiled = list(self.blocks)
        for i, block in enumerate(self.originals):
            self.blocks[i] = block
        try:
            yield
        finally:
            for i, block in enumerate(compiled):
                self.blocks[i] = block
