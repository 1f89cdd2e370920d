"""Multi-crop augmentation of grayscale CT/MR slices (DINOv2/v3 recipe, CT photometrics).

Colour jitter and grayscale conversion have no meaning on a single channel; they are replaced by
a random display window (a HU window/level, in normalised units) and a contrast jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .intensity import MEDDINOV3_CT


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(p: float, generator: torch.Generator | None) -> bool:
    return p > 0 and float(torch.rand((), generator=generator)) < p


def random_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area with aspect
    ratio in ``ratio`` (RandomResizedCrop); the largest central crop of valid aspect if 10 tries fail."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(region: torch.Tensor, size: int) -> torch.Tensor:
    """(1, h, w) -> (1, size, size), bicubic, clamped to the region's range (no bicubic overshoot
    past air or bone)."""
    out = F.interpolate(region[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return out.clamp(region.min(), region.max())


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur of a (1, H, W) image, reflect padding."""
    radius = kernel_size // 2
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[0]


@dataclass
class MultiCropAugmentation:
    """2 global + ``n_local`` local crops of one slice, plus the Gram teacher's crops.

    Input: a normalised slice, (H, W) or (1, H, W), torch or numpy. Output, float32:
      ``global_crops`` (2, 1, global_size, global_size), ``local_crops`` (n_local, 1, local_size,
      local_size) and, when ``gram_scale`` is set, ``gram_teacher_crops`` (2, 1, G, G) with
      G = round(gram_scale * global_size): the region and flip of each global crop at G pixels,
      without photometric changes (DINOv3 Gram anchoring).

    Per crop: random resized crop (bicubic) and horizontal flip; then, with their probabilities,
    a random window (width a fraction ``window_width`` of the value range, level uniform so the
    window stays inside it) stretched back onto the full range, a contrast change by a factor in
    ``contrast`` around the crop mean, and a Gaussian blur (sigma in ``blur_sigma``; probability
    1.0 / 0.1 for the two global crops, 0.5 for local ones); the second global crop is solarised
    (values above the middle of the range mirrored) with probability ``solarize_p``.

    ``value_range``: the range of the normalised intensities (default: the MedDINOv3 CT window,
    -1000..1000 HU); None uses each crop's own min/max (MRI).
    """

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    gram_scale: float | None = 2.0
    value_range: tuple[float, float] | None = MEDDINOV3_CT.output_range()
    flip_p: float = 0.5
    window_p: float = 0.8
    window_width: tuple[float, float] = (0.25, 1.0)
    contrast_p: float = 0.8
    contrast: tuple[float, float] = (0.6, 1.4)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2

    @property
    def gram_size(self) -> int | None:
        return None if self.gram_scale is None else round(self.gram_scale * self.global_size)

    def __call__(self, image: torch.Tensor | np.ndarray, generator: torch.Generator | None = None) -> dict:
        image = torch.as_tensor(image, dtype=torch.float32)
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3 or image.shape[0] != 1:
            raise ValueError(f"expected a (H, W) or (1, H, W) slice, got {tuple(image.shape)}")

        # Geometry first, so that the Gram-teacher crops do not depend on the photometric settings.
        global_regions = [self._random_region(image, self.global_scale, generator) for _ in range(2)]
        local_regions = [self._random_region(image, self.local_scale, generator) for _ in range(self.n_local)]

        global_crops = []
        for i, region in enumerate(global_regions):
            crop = self._photometric(_resize(region, self.global_size), self.blur_p[i], generator)
            if i == 1 and _chance(self.solarize_p, generator):
                crop = self._solarize(crop)
            global_crops.append(crop)
        local_crops = [
            self._photometric(_resize(region, self.local_size), self.blur_p[2], generator) for region in local_regions
        ]
        gram_crops = [] if self.gram_size is None else [_resize(r, self.gram_size) for r in global_regions]

        out = {
            "global_crops": torch.stack(global_crops),
            "local_crops": torch.stack(local_crops) if local_crops else image.new_zeros((0, 1, *[self.local_size] * 2)),
        }
        if gram_crops:
            out["gram_teacher_crops"] = torch.stack(gram_crops)
        return out

    def _random_region(self, image: torch.Tensor, scale, generator) -> torch.Tensor:
        """A random crop at the source resolution, flipped or not: shared by a global crop and its
        Gram-teacher crop so both see the same anatomy in the same layout."""
        top, left, h, w = random_crop_box(image.shape[-2], image.shape[-1], scale, generator)
        region = image[:, top : top + h, left : left + w]
        return region.flip(-1) if _chance(self.flip_p, generator) else region

    def _range(self, crop: torch.Tensor) -> tuple[float, float]:
        if self.value_range is not None:
            return self.value_range
        return float(crop.min()), float(crop.max())

    def _photometric(self, crop: torch.Tensor, blur_p: float, generator) -> torch.Tensor:
        low, high = self._range(crop)
        if _chance(self.window_p, generator) and high > low:
            width = (high - low) * _uniform(*self.window_width, generator)
            window_low = _uniform(low, high - width, generator)
            crop = (crop.clamp(window_low, window_low + width) - window_low) * ((high - low) / width) + low
        if _chance(self.contrast_p, generator):
            mean = crop.mean()
            crop = (crop - mean) * _uniform(*self.contrast, generator) + mean
        if _chance(blur_p, generator):
            crop = gaussian_blur(crop, _uniform(*self.blur_sigma, generator))
        return crop

    def _solarize(self, crop: torch.Tensor) -> torch.Tensor:
        low, high = self._range(crop)
        return torch.where(crop >= (low + high) / 2, low + high - crop, crop)
