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
from nnunet_meddinov3.training.trainer_3d import (  # noqa: F401
    nnUNetTrainerMedDINOv3_3D,
    nnUNetTrainerMedDINOv3_3D_Bottleneck,
    nnUNetTrainerMedDINOv3_3D_DepthConv,
    nnUNetTrainerMedDINOv3_3D_DINOv3,
    nnUNetTrainerMedDINOv3_3D_FrozenEncoder,
    nnUNetTrainerMedDINOv3_3D_LLRD,
    nnUNetTrainerMedDINOv3_3D_LoRA,
    nnUNetTrainerMedDINOv3_3D_Scratch,
    nnUNetTrainerMedDINOv3_3D_Tiny,
    nnUNetTrainerMedDINOv3_3D_TinyDepthConv,
    nnUNetTrainerMedDINOv3_3D_TinyPerSlice,
)
