"""Re-exports the trainers for nnU-Net's external trainer lookup. No code of its own."""
from nnunet_meddinov3.training.trainer import (  # noqa: F401
    nnUNetTrainerMedDINOv3,
    nnUNetTrainerMedDINOv3_Bottleneck,
    nnUNetTrainerMedDINOv3_DINOv3,
    nnUNetTrainerMedDINOv3_FrozenEncoder,
    nnUNetTrainerMedDINOv3_LLRD,
    nnUNetTrainerMedDINOv3_LoRA,
    nnUNetTrainerMedDINOv3_Scratch,
    nnUNetTrainerMedDINOv3_Tiny,
    nnUNetTrainerMedDINOv3_TinyBottleneck,
    nnUNetTrainerShortSchedule,
)
