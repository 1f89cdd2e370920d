"""Intensity presets of pretraining: the plugin's (one implementation, shared with ``meddinov3 features``)."""

from nnunet_meddinov3.data.intensity import MEDDINOV3_CT, CTIntensity, IntensityPreset, MRIntensity, preset_from_dict

__all__ = ["MEDDINOV3_CT", "CTIntensity", "IntensityPreset", "MRIntensity", "preset_from_dict"]
