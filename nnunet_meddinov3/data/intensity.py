"""Intensity conventions: the schema checkpoints record, and the presets that apply it.

The one place the conventions are defined: :data:`INTENSITY_FIELDS` (kind -> required fields),
:func:`validate_intensity`, the named :data:`INTENSITY_PRESETS`, and the CT/MR presets that
normalise arrays. Pretraining normalises with them, exported checkpoints record them as plain
dicts (the header of :mod:`nnunet_meddinov3.checkpoints.format` is validated here), and
``meddinov3 features`` applies a checkpoint's recorded one, so all run this one implementation;
:data:`MEDDINOV3_CT` is the only place its numbers live. numpy only: parsing a preset needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class CTIntensity:
    """Fixed HU window then a global z-score: ``(clip(x, *window) - mean) / std``.

    Defaults are MedDINOv3's: window [-1000, 1000] HU, mean 65.1084, std 178.0166 (the authors'
    demo for the released encoder).
    """

    window: tuple[float, float] = (-1000.0, 1000.0)
    mean: float = 65.1084
    std: float = 178.0166
    kind: ClassVar[str] = "ct"

    def volume_stats(self, volume: np.ndarray) -> dict[str, float]:
        """No per-volume statistics: CT intensities are absolute."""
        return {}

    def apply(self, array: np.ndarray, stats: dict[str, float] | None = None) -> np.ndarray:
        clipped = np.clip(np.asarray(array, dtype=np.float32), *self.window)
        return (clipped - np.float32(self.mean)) / np.float32(self.std)

    def output_range(self) -> tuple[float, float] | None:
        """The normalised values the window maps to."""
        low, high = self.window
        return (low - self.mean) / self.std, (high - self.mean) / self.std

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "window": list(self.window), "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CTIntensity:
        return cls(window=tuple(float(v) for v in d["window"]), mean=float(d["mean"]), std=float(d["std"]))


@dataclass(frozen=True)
class MRIntensity:
    """Per-volume percentile clip then z-score of the clipped volume.

    ``clip(x, p_low, p_high)`` with the volume's ``percentiles`` (0.5 / 99.5 by default), then
    ``(x - mean) / std`` with mean and std of the clipped volume. The statistics must come from
    the whole volume (:meth:`volume_stats`), not from a slice.
    """

    percentiles: tuple[float, float] = (0.5, 99.5)
    kind: ClassVar[str] = "mri"

    def volume_stats(self, volume: np.ndarray) -> dict[str, float]:
        volume = np.asarray(volume, dtype=np.float32)
        low, high = np.percentile(volume, self.percentiles)
        clipped = np.clip(volume, low, high)
        return {"low": float(low), "high": float(high), "mean": float(clipped.mean()), "std": float(clipped.std())}

    def apply(self, array: np.ndarray, stats: dict[str, float] | None = None) -> np.ndarray:
        """Normalise ``array`` with ``stats`` of its volume (computed from ``array`` itself when omitted)."""
        array = np.asarray(array, dtype=np.float32)
        stats = stats or self.volume_stats(array)
        clipped = np.clip(array, stats["low"], stats["high"])
        return (clipped - np.float32(stats["mean"])) / np.float32(max(stats["std"], 1e-8))

    def output_range(self) -> tuple[float, float] | None:
        """Data dependent: no fixed range."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MRIntensity:
        return cls(percentiles=tuple(float(v) for v in d["percentiles"]))


IntensityPreset = CTIntensity | MRIntensity
_PRESETS = {CTIntensity.kind: CTIntensity, MRIntensity.kind: MRIntensity}

MEDDINOV3_CT = CTIntensity()


def merge_preset_dict(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` (some fields of a preset dict) applied to ``base``.

    Naming another ``kind`` starts from that kind's defaults, so ``{"kind": "mri"}`` alone is a
    complete MRI preset; otherwise only the given fields change. An unknown kind is left for
    validation to name.
    """
    kind = update.get("kind", base.get("kind"))
    start = base if kind == base.get("kind") else (_PRESETS[kind]().to_dict() if kind in _PRESETS else {})
    return {**start, **update}


# Intensity conventions a checkpoint can have been pretrained with: kind -> required fields.
INTENSITY_FIELDS = {
    "ct": ("window", "mean", "std"),      # clip to an HU window, then one global z-score
    "mri": ("percentiles",),              # per-volume percentile clip, then per-volume z-score
    "nnunet": (),                         # whatever nnU-Net's plans say (per-dataset normalisation)
    "imagenet": ("mean", "std"),          # natural RGB images: per-channel mean/std (Meta's weights)
    "unknown": (),
}
# Named conventions (``meddinov3 weights convert --intensity NAME``).
INTENSITY_PRESETS = {
    "ct-meddinov3": MEDDINOV3_CT.to_dict(),  # MedDINOv3's CT release (window, mean, std: see MEDDINOV3_CT)
    "nnunet": {"kind": "nnunet"},
    "imagenet": {"kind": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "unknown": {"kind": "unknown"},
}


class IntensityError(ValueError):
    """An intensity convention dict that breaks the schema (:data:`INTENSITY_FIELDS`)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise IntensityError(message)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_intensity(intensity) -> dict:
    """``intensity`` checked against the schema, tuples as lists; :class:`IntensityError` names what is wrong."""
    _check(isinstance(intensity, dict), f"intensity must be a dict, got {intensity!r}")
    kind = intensity.get("kind")
    _check(kind in INTENSITY_FIELDS, f"intensity kind {kind!r} is not one of {sorted(INTENSITY_FIELDS)}")
    required = set(INTENSITY_FIELDS[kind])
    present = set(intensity) - {"kind"}
    _check(required <= present, f"intensity kind '{kind}' needs {sorted(required)}, missing {sorted(required - present)}")
    if kind == "ct":
        window = intensity["window"]
        _check(isinstance(window, (list, tuple)) and len(window) == 2 and all(map(_is_number, window))
               and window[0] < window[1], f"ct window must be [low, high] with low < high, got {window!r}")
        _check(_is_number(intensity["mean"]), "ct mean must be a number")
        _check(_is_number(intensity["std"]) and intensity["std"] > 0, "ct std must be a positive number")
    if kind == "mri":
        p = intensity["percentiles"]
        _check(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_number, p)) and 0 <= p[0] < p[1] <= 100,
               f"mri percentiles must be [low, high] within 0..100, got {p!r}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in intensity.items()}


def preset_from_dict(d: dict[str, Any]) -> IntensityPreset:
    """Rebuild a preset from its :meth:`to_dict` form (dispatching on ``kind``)."""
    cls = _PRESETS.get(d.get("kind")) if isinstance(d, dict) else None
    if cls is None:
        raise ValueError(f"unknown intensity preset {d!r}")
    return cls.from_dict(validate_intensity(d))  # a missing or bad field is named, not "unknown preset"


# nnU-Net's CTNormalization is ``(clip(x, percentile_00_5, percentile_99_5) - mean) / std`` with the
# numbers taken from the plans' ``foreground_intensity_properties_per_channel``: the same formula as
# CTIntensity. So either side can adopt the other's numbers exactly, without a new nnU-Net class
# (nnU-Net 2.8 finds normalisation classes only inside its own package).
NNUNET_CT_KEYS = ("percentile_00_5", "percentile_99_5", "mean", "std")


def nnunet_ct_properties(preset: CTIntensity) -> dict[str, float]:
    """The intensity properties that make nnU-Net's CTNormalization compute ``preset.apply``."""
    low, high = preset.window
    return {"percentile_00_5": float(low), "percentile_99_5": float(high), "mean": float(preset.mean),
            "std": float(preset.std)}


def ct_preset_from_nnunet(properties: dict[str, Any]) -> CTIntensity:
    """The CT preset that equals nnU-Net's CTNormalization with these (one channel's) properties."""
    missing = [k for k in NNUNET_CT_KEYS if k not in properties]
    if missing:
        raise ValueError(f"nnU-Net intensity properties lack {missing}; expected the plans' or fingerprint's "
                         f"foreground_intensity_properties_per_channel entry of a CT channel")
    return CTIntensity(window=(float(properties["percentile_00_5"]), float(properties["percentile_99_5"])),
                       mean=float(properties["mean"]), std=max(float(properties["std"]), 1e-8))


def mri_preset_like_nnunet_zscore() -> MRIntensity:
    """nnU-Net's ZScoreNormalization without a mask: a z-score of the whole volume, no clipping."""
    return MRIntensity(percentiles=(0.0, 100.0))


def preset_from_nnunet_plans(plans: dict[str, Any], channel: int = 0, configuration: str = "2d") -> IntensityPreset:
    """The preset that equals nnU-Net's normalisation of ``channel`` in these plans.

    Pretraining with it sees the intensities nnU-Net's preprocessing gives the same dataset at
    fine-tuning time: CTNormalization exactly, ZScoreNormalization without a mask exactly (a
    masked z-score has no preset form and is refused).
    """
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise ValueError(f"the plans have no configuration '{configuration}' (they have {sorted(configurations)})")
    conf = configurations[configuration]
    schemes = conf["normalization_schemes"]
    if not 0 <= channel < len(schemes):
        raise ValueError(f"channel {channel} is out of range: the plans normalise {len(schemes)} channel(s)")
    scheme = schemes[channel]
    if scheme == "CTNormalization":
        return ct_preset_from_nnunet(plans["foreground_intensity_properties_per_channel"][str(channel)])
    if scheme == "ZScoreNormalization" and not conf["use_mask_for_norm"][channel]:
        return mri_preset_like_nnunet_zscore()
    masked = " inside the foreground mask" if scheme == "ZScoreNormalization" else ""
    raise ValueError(f"nnU-Net's {scheme}{masked} (channel {channel}) has no pretraining preset; "
                     f"use data.intensity.kind=ct or kind=mri")


def compare_with_nnunet(convention: dict[str, Any] | None, scheme: str, use_mask: bool,
                        properties: dict[str, Any]) -> tuple[bool, str]:
    """``(same, description)``: does nnU-Net's normalisation of one channel (its scheme, mask flag and
    plans properties) compute the weights' recorded pretraining convention?"""
    kind = (convention or {}).get("kind")
    if scheme == "CTNormalization" and not all(k in properties for k in NNUNET_CT_KEYS):
        return False, "nnU-Net's CTNormalization, but the plans record no intensity properties for this channel"
    if scheme == "CTNormalization":
        ours = ct_preset_from_nnunet(properties)
        plans = (f"nnU-Net's CTNormalization: window [{ours.window[0]:g}, {ours.window[1]:g}], mean {ours.mean:.4g}, "
                 f"std {ours.std:.4g}")
        if kind == "ct":
            theirs = CTIntensity.from_dict(convention)
            same = bool(np.allclose([*theirs.window, theirs.mean, theirs.std], [*ours.window, ours.mean, ours.std],
                                    rtol=1e-5, atol=1e-4))
            if same:
                return True, f"the same as the weights' pretraining ({plans})"
            return False, (f"{plans}; the weights were pretrained with window [{theirs.window[0]:g}, "
                           f"{theirs.window[1]:g}], mean {theirs.mean:.4g}, std {theirs.std:.4g}")
    else:
        plans = f"nnU-Net's {scheme}" + (" inside the foreground mask" if use_mask else "")
        if kind == "mri" and scheme == "ZScoreNormalization" and not use_mask:
            exact = tuple(convention["percentiles"]) == (0.0, 100.0)
            return exact, f"{plans}" + ("" if exact else f"; the weights also clipped at {convention['percentiles']} "
                                                          f"percentiles")
    return False, f"{plans}; the weights were pretrained with {kind or 'an unrecorded'} intensities"
