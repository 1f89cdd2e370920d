"""Pictures of what an encoder sees: PCA and cosine-similarity maps of its dense patch features.

``meddinov3 features`` is the command line; :mod:`nnunet_meddinov3.visualize.features` does the work,
with the presets and defaults of :mod:`nnunet_meddinov3.visualize.feature_settings`.

Names are imported lazily (PEP 562, a documented exception to top-level imports), so the command line
reads ``feature_settings`` without pulling in torch.
"""
from __future__ import annotations

from nnunet_meddinov3.lazy_exports import lazy_exports

_EXPORTS = {
    "feature_settings": ("INTENSITY_PRESETS",),
    "features": ("FeaturePictureError", "feature_picture"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
