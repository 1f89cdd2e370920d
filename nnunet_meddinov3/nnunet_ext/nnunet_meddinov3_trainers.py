"""Re-exports the trainers for nnU-Net's external trainer lookup. No code of its own."""
from nnunet_meddinov3.training.trainer import *  # noqa: F401,F403 (every trainer class: its __all__)
from nnunet_meddinov3.training.trainer_3d import *  # noqa: F401,F403
