"""Pretraining data: slice dataset over unlabeled volumes, intensity presets, multi-crop
augmentation, iBOT block masks and batch collation."""

from .augment import MultiCropAugmentation
from .collate import collate
from .intensity import MEDDINOV3_CT, CTIntensity, IntensityPreset, MRIntensity, preset_from_dict
from .masking import BlockMaskGenerator
from .slices import DataError, Exclusion, SliceDataset, VolumeSource, find_volumes

__all__ = [
    "MEDDINOV3_CT",
    "BlockMaskGenerator",
    "CTIntensity",
    "DataError",
    "Exclusion",
    "IntensityPreset",
    "MRIntensity",
    "MultiCropAugmentation",
    "SliceDataset",
    "VolumeSource",
    "collate",
    "find_volumes",
    "preset_from_dict",
]
