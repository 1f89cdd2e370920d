"""The feature pictures' intensity presets and defaults, the one place they are defined.

numpy at most (through :mod:`nnunet_meddinov3.data.intensity`), no torch: ``meddinov3 features
--help`` offers these without building an encoder; :mod:`nnunet_meddinov3.visualize.features` applies them.
"""
from __future__ import annotations

from nnunet_meddinov3.data.intensity import INTENSITY_PRESETS as CHECKPOINT_INTENSITIES

DEFAULT_INTENSITY = "ct-meddinov3"
DEFAULT_FOREGROUND_THRESHOLD = 0.1

# Named conventions for checkpoints that record none; a recorded ``intensity`` dict has the same form
# (nnunet_meddinov3.data.intensity.INTENSITY_FIELDS).
INTENSITY_PRESETS: dict[str, dict] = {
    # MedDINOv3's: HU window [-1000, 1000], then a global z-score with the authors' statistics.
    "ct-meddinov3": CHECKPOINT_INTENSITIES["ct-meddinov3"],
    # Volume min-max to [0, 1], then ImageNet standardisation: for Meta's natural-image weights.
    "minmax": CHECKPOINT_INTENSITIES["imagenet"],
    # Volume z-score (nnU-Net's ZScoreNormalization for non-CT images).
    "zscore": {"kind": "zscore"},
}
# Recorded kinds that say nothing usable for one image: the option or default applies instead.
UNUSABLE_INTENSITY_KINDS = ("nnunet", "unknown")
