"""Dense-feature pictures of one CT/MR slice: the slice, a PCA of the patch features, a similarity map.

Steps, in order:

1. Read the image with SimpleITK (a file, or a folder holding one DICOM series). A 3D volume
   gives one slice: index ``slice_index`` along the last SimpleITK axis (the first numpy axis),
   the middle one by default. Multi-component (RGB) pixels are averaged to gray.
2. Normalise intensities with the convention the checkpoint records (the header of a file in
   this project's safetensors format, else the registry entry when the checkpoint is given by
   name), else with the requested preset (:data:`INTENSITY_PRESETS`); a recorded kind of
   ``nnunet`` or ``unknown`` says nothing usable and counts as none. Statistics, where a
   convention needs them, come from the whole volume, as in training.
3. Resize the slice to ``size`` x ``size`` (bilinear, antialiased; a non-square slice is
   stretched), ``size`` a multiple of the 16-pixel patch.
4. Encoder features of the last block: normalised patch tokens,
   ``encoder.intermediate_features(x, [depth - 1])``, a (D, size/16, size/16) map.
5. Foreground: a patch is foreground when the mean of its pixels in the *display image* exceeds
   ``foreground_threshold`` (default 0.1). The display image is the normalised slice mapped to
   [0, 1]: through the CT window for CT conventions (air is 0, fat ~0.45, soft tissue ~0.5), else
   through the slice's own min and max. 0 disables the mask.
6. PCA of the foreground patch features (centred, SVD); the first three components, each scaled
   to [0, 1] between its 1st and 99th percentile over the foreground, are the RGB channels;
   background patches are black. Component signs follow the largest loading (deterministic).
7. Cosine similarity of every patch's feature to the feature of the patch under ``point``
   ((row, column) in pixels of the original slice, the centre by default), shown on [-1, 1].

The PNG is exactly ``3 * size`` by ``size`` pixels: three ``size``-pixel panels side by side
(slice, PCA, similarity with the point marked), drawn at ``dpi = size`` on a 3 x 1 inch figure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_meddinov3.checkpoints.conversion import hf_config_hints
from nnunet_meddinov3.checkpoints.converters import infer_encoder_config
from nnunet_meddinov3.checkpoints.format import METADATA_KEY, CheckpointMetadata, read_safetensors_header
from nnunet_meddinov3.checkpoints.keys import LayoutError, describe_checkpoint
from nnunet_meddinov3.checkpoints.loading import fitting_configs, load_encoder_weights, read_source
from nnunet_meddinov3.checkpoints.registry import registry_entries, resolve_weights
from nnunet_meddinov3.data.intensity import preset_from_dict
from nnunet_meddinov3.network.configs import ENCODER_CONFIGS, PATCH_SIZE, EncoderConfig
from nnunet_meddinov3.network.encoder import build_encoder
from nnunet_meddinov3.visualize.feature_settings import (
    DEFAULT_FOREGROUND_THRESHOLD,
    DEFAULT_INTENSITY,
    INTENSITY_PRESETS,
    UNUSABLE_INTENSITY_KINDS,
)


class FeaturePictureError(ValueError):
    """Bad input for a feature picture (image, slice, size, point or intensity convention)."""


@dataclass
class Conventions:
    """What the picture was made with, and where each choice came from."""

    encoder: object  # a config name or an EncoderConfig
    encoder_source: str
    intensity: dict
    intensity_source: str
    weights: object = None  # the SourceCheckpoint read to infer the architecture, so it is read only once


# --------------------------------------------------------------------------------------------
# Image and intensities
# --------------------------------------------------------------------------------------------

def read_slice(path: str | Path, slice_index: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(slice, whole volume, description) as float32 arrays; a 2D image is its own volume."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise FeaturePictureError(f"image '{path}' does not exist")
    try:
        if path.is_dir():  # a DICOM series folder
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise FeaturePictureError(f"'{path}' is a folder without a DICOM series")
            image = sitk.ReadImage(files)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise FeaturePictureError(f"SimpleITK cannot read '{path}': {str(e).strip().splitlines()[-1]}") from None
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array.mean(axis=-1)  # RGB(A) photographs/screenshots: gray is what the encoder takes
    if image.GetDimension() == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        if slice_index is not None and slice_index != 0:
            raise FeaturePictureError(f"--slice {slice_index} given, but '{path.name}' is a 2D image")
        return array, array, f"{path.name} (2D, {array.shape[1]}x{array.shape[0]})"
    if array.ndim != 3:
        raise FeaturePictureError(f"'{path.name}' has {image.GetDimension()} dimensions; give a 2D or 3D image")
    n = array.shape[0]
    index = n // 2 if slice_index is None else slice_index
    if not 0 <= index < n:
        raise FeaturePictureError(f"--slice {index} is out of range: '{path.name}' has {n} slices (0..{n - 1})")
    return array[index], array, f"{path.name} slice {index}/{n}"


def normalize(slice_: np.ndarray, volume: np.ndarray, intensity: dict) -> np.ndarray:
    """Apply an intensity convention to a slice, with statistics from its volume where needed."""
    kind = intensity.get("kind")
    x = slice_.astype(np.float32)
    if kind in ("ct", "mri"):  # pretraining's own presets
        preset = preset_from_dict(intensity)
        return preset.apply(x, preset.volume_stats(volume))
    if kind == "zscore":
        return (x - volume.mean()) / max(float(volume.std()), 1e-8)
    if kind == "imagenet":  # natural-image weights: [0, 1] like an 8-bit photo, then their mean/std
        low, high = float(volume.min()), float(volume.max())
        scaled = (x - low) / max(high - low, 1e-8)
        return (scaled - float(np.mean(intensity["mean"]))) / float(np.mean(intensity["std"]))
    raise FeaturePictureError(f"unknown intensity convention {intensity!r}; known kinds: ct, mri, zscore, imagenet")


def display_range(normalized: np.ndarray, intensity: dict) -> tuple[float, float]:
    """The normalised values shown as black and white (and used by the foreground rule)."""
    if intensity.get("kind") == "ct":
        return preset_from_dict(intensity).output_range()
    return float(normalized.min()), float(normalized.max())


# --------------------------------------------------------------------------------------------
# Checkpoint conventions
# --------------------------------------------------------------------------------------------

def recorded_metadata(checkpoint: str) -> tuple[dict, str]:
    """What a checkpoint records (``architecture`` or ``encoder``, ``intensity``) and where from:
    the header of a file in this project's safetensors format, else the registry entry of a name.
    ({}, "") when neither records anything."""
    path = resolve_weights(checkpoint)
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)  # the header only: the weights are read once, by the load
        if METADATA_KEY in header:
            metadata = CheckpointMetadata.from_dict(json.loads(header[METADATA_KEY]))
            return {"architecture": metadata.architecture, "intensity": metadata.intensity}, f"metadata of {path.name}"
    entry = registry_entries().get(str(checkpoint))
    if entry and not Path(str(checkpoint)).exists():
        return {k: entry[k] for k in ("encoder", "intensity") if entry.get(k)}, f"registry entry '{checkpoint}'"
    return {}, ""


def _encoder_from_metadata(metadata: dict):
    """An EncoderConfig (recorded architecture), a config name (registry), or None."""
    if isinstance(metadata.get("architecture"), dict):
        return EncoderConfig(**metadata["architecture"])
    return metadata.get("encoder") or None


def encoder_label(encoder) -> str:
    """A config name, or for a recorded architecture the name of the equal named config if any."""
    if isinstance(encoder, str):
        return encoder
    same = [name for name, config in ENCODER_CONFIGS.items() if config == encoder]
    return same[0] if same else f"ViT/{encoder.patch_size} dim {encoder.embed_dim} depth {encoder.depth}"


def architecture_from_weights(checkpoint: str):
    """(EncoderConfig, where it came from, the SourceCheckpoint read) for weights that record no architecture:
    inferred from the layout and the tensor shapes, as ``meddinov3 weights info`` does."""
    path = resolve_weights(checkpoint)
    weights = read_source(path)
    try:
        config = infer_encoder_config(weights.state, weights.layout, **hf_config_hints(path))
    except LayoutError as e:
        fits = fitting_configs(describe_checkpoint(weights.state))
        raise FeaturePictureError(
            f"'{path}' ({weights.layout} layout) does not say which encoder it is ({e}); name it with --encoder "
            f"({'configs that fit its shapes: ' + ', '.join(fits) if fits else 'one of ' + ', '.join(sorted(ENCODER_CONFIGS))})"
        ) from None
    return config, f"inferred from {path.name}, layout {weights.layout}", weights


def resolve_conventions(checkpoint: str, encoder: str | None, intensity: str | None) -> Conventions:
    """Recorded conventions first, then the options; an architecture nothing records or names is inferred
    from the weights themselves (never a default guess, which fails on the shapes of any other size)."""
    metadata, source = recorded_metadata(checkpoint)
    recorded_encoder = _encoder_from_metadata(metadata)
    recorded_intensity = metadata.get("intensity")
    weights = None
    if recorded_encoder is not None:
        enc, enc_source = recorded_encoder, source
        if isinstance(enc, str) and enc not in ENCODER_CONFIGS:
            raise FeaturePictureError(f"{source} names encoder '{enc}', which this version cannot build; "
                                      f"known: {', '.join(sorted(ENCODER_CONFIGS))}")
    elif encoder:
        if encoder not in ENCODER_CONFIGS:
            raise FeaturePictureError(f"unknown encoder '{encoder}'; known: {', '.join(sorted(ENCODER_CONFIGS))}")
        enc, enc_source = encoder, "--encoder"
    else:
        enc, enc_source, weights = architecture_from_weights(checkpoint)
    if isinstance(recorded_intensity, dict) and recorded_intensity.get("kind") not in (None, *UNUSABLE_INTENSITY_KINDS):
        inten, inten_source = dict(recorded_intensity), source
    else:
        name = intensity or DEFAULT_INTENSITY
        if name not in INTENSITY_PRESETS:
            raise FeaturePictureError(f"unknown intensity preset '{name}'; choose one of {sorted(INTENSITY_PRESETS)}")
        inten, inten_source = dict(INTENSITY_PRESETS[name]), f"--intensity {name}" if intensity else f"default ({name})"
    return Conventions(enc, enc_source, inten, inten_source, weights)


# --------------------------------------------------------------------------------------------
# Features, PCA, similarity
# --------------------------------------------------------------------------------------------

def resize(image: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def last_block_features(encoder, image: np.ndarray) -> np.ndarray:
    """(D, h, w) normalised patch tokens of the encoder's last block for a (H, W) input."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    encoder.eval()
    with torch.inference_mode():
        features = encoder.intermediate_features(x, [encoder.depth - 1])[0]
    return features[0].float().numpy()


def foreground_patches(display01: np.ndarray, patch: int, threshold: float) -> np.ndarray:
    """(h, w) mask: patches whose mean display intensity (in [0, 1]) exceeds ``threshold``."""
    h, w = display01.shape[0] // patch, display01.shape[1] // patch
    means = display01[:h * patch, :w * patch].reshape(h, patch, w, patch).mean(axis=(1, 3))
    return means > threshold


def pca_rgb(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(h, w, 3) in [0, 1]: the first three principal components of the masked patch features."""
    d, h, w = features.shape
    tokens = features.reshape(d, h * w).T.astype(np.float64)
    keep = mask.reshape(-1)
    if keep.sum() < 3:  # too little foreground to fit a 3-component PCA: use every patch
        keep = np.ones_like(keep)
    fitted = tokens[keep]
    mean = fitted.mean(axis=0)
    _, _, components = np.linalg.svd(fitted - mean, full_matrices=False)
    components = components[:3]
    # svd signs are arbitrary; make each component's largest loading positive so runs agree
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    projected = (tokens - mean) @ components.T
    low = np.percentile(projected[keep], 1, axis=0)
    high = np.percentile(projected[keep], 99, axis=0)
    rgb = np.clip((projected - low) / np.maximum(high - low, 1e-8), 0, 1)
    if rgb.shape[1] < 3:  # fewer patches/features than 3 components
        rgb = np.pad(rgb, ((0, 0), (0, 3 - rgb.shape[1])))
    rgb[~keep] = 0.0
    return rgb.reshape(h, w, 3)


def cosine_similarity_map(features: np.ndarray, patch_yx: tuple[int, int]) -> np.ndarray:
    """(h, w) cosine similarity of every patch feature to the feature at ``patch_yx``."""
    d = features.shape[0]
    flat = features.reshape(d, -1).astype(np.float64)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=0, keepdims=True), 1e-12)
    query = flat[:, patch_yx[0] * features.shape[2] + patch_yx[1]]
    return (query @ flat).reshape(features.shape[1:])


# --------------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------------

def render(slice01: np.ndarray, rgb: np.ndarray, similarity: np.ndarray, point_px: tuple[float, float],
           labels: tuple[str, str, str], out_path: Path, size: int, description: str) -> None:
    """Write the three panels as a PNG of exactly 3*size x size pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # dpi = size on a 3 x 1 inch figure: every panel is exactly size pixels, whatever size is.
    figure = Figure(figsize=(3, 1), dpi=size)
    FigureCanvasAgg(figure)
    font_pt = 2.6  # points at dpi=size: ~size/28 pixels, readable at every size
    panels = ((slice01, dict(cmap="gray", vmin=0, vmax=1)), (rgb, {}),
              (similarity, dict(cmap="RdBu_r", vmin=-1, vmax=1)))
    for i, ((picture, style), label) in enumerate(zip(panels, labels)):
        axes = figure.add_axes((i / 3, 0, 1 / 3, 1))
        axes.imshow(picture, interpolation="nearest", extent=(-0.5, size - 0.5, size - 0.5, -0.5), **style)
        axes.set_xlim(-0.5, size - 0.5)
        axes.set_ylim(size - 0.5, -0.5)
        axes.set_axis_off()
        axes.text(0.02, 0.98, label, transform=axes.transAxes, va="top", ha="left", color="white",
                  fontsize=font_pt, bbox=dict(facecolor="black", alpha=0.55, edgecolor="none", pad=0.6))
        if i in (0, 2):
            axes.plot([point_px[1]], [point_px[0]], marker="+", markersize=5, markeredgewidth=0.6,
                      color="yellow" if i == 0 else "lime")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=size, format="png", metadata={"Description": description})


def feature_picture(image: str | Path, checkpoint: str, out: str | Path, *, slice_index: int | None = None,
                    encoder: str | None = None, size: int = 448, point: tuple[float, float] | None = None,
                    intensity: str | None = None,
                    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD) -> dict:
    """Make the three-panel PNG (see the module docstring); returns what was used, for printing.

    Raises :class:`FeaturePictureError` for bad inputs and
    :class:`~nnunet_meddinov3.checkpoints.CheckpointMismatchError` when the weights do not fit.
    """
    if size <= 0 or size % PATCH_SIZE:
        raise FeaturePictureError(f"--size {size} is not a positive multiple of {PATCH_SIZE} (the ViT patch); "
                                  f"try {max(PATCH_SIZE, round(size / PATCH_SIZE) * PATCH_SIZE)}")
    slice_, volume, description = read_slice(image, slice_index)
    height, width = slice_.shape
    if point is None:
        point = ((height - 1) / 2, (width - 1) / 2)
    if not (0 <= point[0] < height and 0 <= point[1] < width):
        raise FeaturePictureError(f"--point {point[0]:g} {point[1]:g} is outside the {height}x{width} slice "
                                  f"(row 0..{height - 1}, column 0..{width - 1})")

    conventions = resolve_conventions(checkpoint, encoder, intensity)
    model = build_encoder(conventions.encoder, in_channels=1)
    if conventions.weights is not None:  # already read to infer the architecture
        load_encoder_weights(model, conventions.weights.raw, name=f"'{conventions.weights.path}'")
        layout = conventions.weights.layout
    else:
        layout = load_encoder_weights(model, checkpoint)  # strict: raises CheckpointMismatchError

    normalized = normalize(slice_, volume, conventions.intensity)
    low, high = display_range(normalized, conventions.intensity)
    resized = resize(normalized, size)
    display01 = np.clip((resized - low) / max(high - low, 1e-8), 0, 1)
    features = last_block_features(model, resized)
    grid = features.shape[1]
    mask = (foreground_patches(display01, PATCH_SIZE, foreground_threshold) if foreground_threshold > 0
            else np.ones((grid, grid), dtype=bool))
    rgb = pca_rgb(features, mask)
    # the patch holding the point's pixel centre after the resize
    patch_yx = (min(int((point[0] + 0.5) * grid / height), grid - 1),
                min(int((point[1] + 0.5) * grid / width), grid - 1))
    similarity = cosine_similarity_map(features, patch_yx)
    point_px = ((point[0] + 0.5) * size / height - 0.5, (point[1] + 0.5) * size / width - 0.5)

    config_name = encoder_label(conventions.encoder)
    labels = (description, f"PCA 1-3 of {config_name} last block, {int(mask.sum())}/{mask.size} fg patches",
              f"cosine similarity to ({point[0]:g}, {point[1]:g}), [-1, 1]")
    out = Path(out)
    summary = {
        "image": description, "checkpoint": str(checkpoint), "layout": layout,
        "encoder": config_name,
        "architecture": (ENCODER_CONFIGS[conventions.encoder] if isinstance(conventions.encoder, str)
                         else conventions.encoder).to_dict(),
        "encoder_source": conventions.encoder_source, "intensity": conventions.intensity,
        "intensity_source": conventions.intensity_source, "size": size, "point": list(point),
        "foreground_patches": int(mask.sum()), "patches": int(mask.size), "output": str(out),
    }
    render(display01, rgb, similarity, point_px, labels, out, size, json.dumps(summary))
    return summary
