"""Weights flow: public file or pretrain export -> converter -> one format -> encoder.

Modules, each depending only on those before it (tests/test_import_graph.py checks there is no cycle):
``keys`` (key names, layout detection; a leaf), ``registry`` (names -> files; a leaf), ``converters``
(foreign layouts -> encoder keys), ``format`` (read/write/verify this project's files), ``loading``
(strict load into an encoder, encoders built from weights), ``conversion`` (anything -> the format),
``conventions`` (a source's recorded intensity convention, read from a header or the registry),
``download`` (registered files from the Hugging Face hub; a leaf).

Names are imported lazily (PEP 562, a documented exception to top-level imports), so
``registry_entries`` (used by ``meddinov3 weights list``) does not pull in torch.
"""
from __future__ import annotations

from nnunet_meddinov3.lazy_exports import lazy_exports

_EXPORTS = {
    "keys": ("LayoutError", "describe_checkpoint", "detect_layout"),
    "converters": ("infer_encoder_config", "read_dcp_backbone", "to_encoder_layout"),
    "loading": ("CheckpointMismatchError", "adapt_patch_embed", "build_encoder", "build_encoder_from_checkpoint",
                "load_encoder_weights", "read_source", "read_state_dict"),
    "format": ("CheckpointFormatError", "CheckpointMetadata", "LoadedCheckpoint", "read_checkpoint",
               "tensor_sha256", "file_sha256", "write_checkpoint"),
    "conversion": ("convert_checkpoint",),
    "registry": ("cache_dir", "registry_entries", "resolve_weights"),
    "download": ("FetchError", "download_from_hub"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
