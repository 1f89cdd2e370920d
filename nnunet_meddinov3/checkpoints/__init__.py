"""Weights flow: public file or pretrain export -> converter -> one format -> encoder.

Modules, each depending only on those before it (tests/test_import_graph.py checks there is no cycle):
``keys`` (key names, layout detection; a leaf), ``registry`` (names -> files; a leaf), ``converters``
(foreign layouts -> encoder keys), ``format`` (read/write/verify this project's files), ``loading``
(strict load into an encoder, encoders built from weights), ``conversion`` (anything -> the format),
``conventions`` (a source's recorded intensity convention, read from a header or the registry).

Names are imported lazily (PEP 562, a documented exception to top-level imports), so
``registry_entries`` (used by ``meddinov3 weights list``) does not pull in torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "keys": ("LayoutError", "describe_checkpoint", "detect_layout"),
    "converters": ("infer_encoder_config", "read_dcp_backbone", "to_encoder_layout"),
    "loading": ("CheckpointMismatchError", "adapt_patch_embed", "build_encoder", "build_encoder_from_checkpoint",
                "load_encoder_weights", "read_source", "read_state_dict"),
    "format": ("CheckpointFormatError", "CheckpointMetadata", "LoadedCheckpoint", "read_checkpoint",
               "tensor_sha256", "file_sha256", "write_checkpoint"),
    "conversion": ("convert_checkpoint",),
    "registry": ("cache_dir", "registry_entries", "resolve_weights"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
