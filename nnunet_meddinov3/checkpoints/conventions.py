"""What a weights source records about its pretraining convention, read without loading tensors.

The planner matches nnU-Net's normalisation to it and the trainer checks it, so both need the
intensity convention of a registry name or a file before any weights are fetched or loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunet_meddinov3.checkpoints.format import METADATA_KEY, read_safetensors_header
from nnunet_meddinov3.checkpoints.registry import registry_entries


def recorded_intensity(source: str) -> tuple[dict | None, str]:
    """``(intensity dict, where it was read)``, or ``(None, why not)`` when nothing is recorded.

    A registry name answers from its entry (no download needed); a file in this project's
    safetensors format from its header. Foreign files (hub .pth, HF, timm) record no convention.
    """
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        entry = registry_entries().get(text)
        if entry is None:
            raise FileNotFoundError(f"weights '{text}' are neither a file nor a registry name "
                                    f"(see `meddinov3 weights list`)")
        intensity = entry.get("intensity")
        return (dict(intensity), f"registry entry '{text}'") if intensity else (None, f"registry entry '{text}' "
                                                                                     "records no intensity")
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        if METADATA_KEY in header:
            intensity = json.loads(header[METADATA_KEY]).get("intensity")
            if isinstance(intensity, dict) and intensity.get("kind") not in (None, "unknown"):
                return dict(intensity), f"metadata of {path.name}"
    return None, f"{path.name} records no intensity convention (not in this project's format)"
