"""Pictures of what an encoder sees: PCA and cosine-similarity maps of its dense patch features.

``meddinov3 features`` is the command line; :mod:`nnunet_meddinov3.visualize.features` does the work.
"""
from nnunet_meddinov3.visualize.features import (
    INTENSITY_PRESETS,
    FeaturePictureError,
    feature_picture,
)

__all__ = ["INTENSITY_PRESETS", "FeaturePictureError", "feature_picture"]
