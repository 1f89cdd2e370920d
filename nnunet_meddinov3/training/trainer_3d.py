"""nnU-Net trainers for MedDINOv3Net3D on nnU-Net's ``3d_fullres``, by name.

Every MedDINOv3 trainer trains 3d_fullres as nnU-Net's own trainer does (trainer.py: the same 2D
encoder on every slice of the plane of the last two axes, with cross-slice context that starts as the
identity), so ``-tr nnUNetTrainerMedDINOv3 -c 3d_fullres`` works and nnU-Net's model selection can
compare 2d and 3d_fullres of one trainer. These are the same trainers restricted to 3D, named for it:
each is its namesake with ``_3D`` after ``MedDINOv3``, plus the context variants compared in the
README. The weights, the recipe, LoRA, crash safety and everything else are the 2D trainer's, so any
2D weights file fine-tunes here unchanged and no 3D pretraining is needed.

On stock ``nnUNetPlans`` the network comes from the class (its ``context`` included); on
``nnUNetPlansMedDINOv3`` from the plans' ``3d_fullres`` configuration, which ``meddinov3
plan_and_preprocess`` writes with an in-plane patch of multiples of 16 and slices and batch from the
memory model.
"""
from __future__ import annotations

from nnunet_meddinov3.network.volumetric import MedDINOv3Net3D
from nnunet_meddinov3.training.trainer import (
    nnUNetTrainerMedDINOv3,
    nnUNetTrainerMedDINOv3_Bottleneck,
    nnUNetTrainerMedDINOv3_DINOv3,
    nnUNetTrainerMedDINOv3_FrozenEncoder,
    nnUNetTrainerMedDINOv3_LLRD,
    nnUNetTrainerMedDINOv3_LoRA,
    nnUNetTrainerMedDINOv3_Scratch,
    nnUNetTrainerMedDINOv3_Tiny,
)


class Volumetric:
    """Makes a MedDINOv3 trainer 3D only (the 2D trainers take 3d_fullres too, as nnU-Net's own trainer
    does): a 2d configuration gets told which trainer takes it. Put it first in the bases."""

    network_classes = {3: MedDINOv3Net3D}


class nnUNetTrainerMedDINOv3_3D(Volumetric, nnUNetTrainerMedDINOv3):
    """MedDINOv3 ViT-B/16 CT weights on every slice, slice attention across them (the 2D recipe)."""


class nnUNetTrainerMedDINOv3_3D_Tiny(Volumetric, nnUNetTrainerMedDINOv3_Tiny):
    """The tiny CPU encoder in 3D: the tests and quick checks."""


class nnUNetTrainerMedDINOv3_3D_TinyDepthConv(Volumetric, nnUNetTrainerMedDINOv3_Tiny):
    """The tiny model with the decoder-side placement: a depth convolution on the tapped features."""

    network_overrides = {**nnUNetTrainerMedDINOv3_Tiny.network_overrides, "context": "depth_conv"}


class nnUNetTrainerMedDINOv3_3D_TinyPerSlice(Volumetric, nnUNetTrainerMedDINOv3_Tiny):
    """The tiny model on each slice alone (no cross-slice context): what the context adds is measured
    against it."""

    network_overrides = {**nnUNetTrainerMedDINOv3_Tiny.network_overrides, "context": "none"}


class nnUNetTrainerMedDINOv3_3D_DepthConv(Volumetric, nnUNetTrainerMedDINOv3):
    """ViT-B with the decoder-side placement of the context (depth convolution)."""

    network_overrides = {**nnUNetTrainerMedDINOv3.network_overrides, "context": "depth_conv"}


class nnUNetTrainerMedDINOv3_3D_DINOv3(Volumetric, nnUNetTrainerMedDINOv3_DINOv3):
    """Official natural-image DINOv3 ViT-B/16 weights in 3D."""


class nnUNetTrainerMedDINOv3_3D_Scratch(Volumetric, nnUNetTrainerMedDINOv3_Scratch):
    """The 3D network from random initialisation."""


class nnUNetTrainerMedDINOv3_3D_FrozenEncoder(Volumetric, nnUNetTrainerMedDINOv3_FrozenEncoder):
    """Frozen encoder: the slice context and the decoder train."""


class nnUNetTrainerMedDINOv3_3D_LoRA(Volumetric, nnUNetTrainerMedDINOv3_LoRA):
    """LoRA adapters on the frozen encoder, plus the slice context and the decoder."""


class nnUNetTrainerMedDINOv3_3D_LLRD(Volumetric, nnUNetTrainerMedDINOv3_LLRD):
    """Layer-wise LR decay and warm-up in 3D."""


class nnUNetTrainerMedDINOv3_3D_Bottleneck(Volumetric, nnUNetTrainerMedDINOv3_Bottleneck):
    """The cheaper bottleneck decoder in 3D."""


# What nnunet_ext/ re-exports for nnU-Net's trainer lookup: every trainer class defined here.
__all__ = [name for name, value in list(globals().items())
           if name.startswith("nnUNetTrainer") and getattr(value, "__module__", None) == __name__]
