"""A second synthetic CT generator, a thorax, for checking that what was tuned on the demo's abdomen
(:mod:`nnunet_meddinov3.data.synthetic_ct`) carries over to other data.

Everything the abdomen fixes differs here:

- anatomy: two lungs of air (~ -850 HU) with vessel dots, a heart (~40 HU) with a brighter blood pool,
  a contrast-filled aorta (~250 HU), a spine with a cortical rim, ribs around the chest wall and a
  sternum. Labels 1 lung (both), 2 heart, 3 aorta.
- sizes: non-square slices (default 112 x 128, against 96 x 96), a slice count that varies per case
  (``shape[0]`` +- 4, against a fixed 12), thinner slices (2 mm, against 2.5 mm).
- noise: spatially correlated (white noise smoothed over ~1.5 voxels in-plane, as a reconstruction
  kernel makes it) at a std of ~25 HU, against the abdomen's independent 15 HU per voxel.

The files are written by the abdomen module's writer, so nnU-Net and ``python -m pretrain`` read both alike.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from .synthetic_ct import _ellipsoid, write_nnunet_raw_dataset

LABELS = {"background": 0, "lung": 1, "heart": 2, "aorta": 3}
NOISE_HU = 25.0  # std of the correlated noise after smoothing


def thorax_case(rng: np.random.Generator, shape=(20, 112, 128)) -> tuple[np.ndarray, np.ndarray]:
    """One (image in HU as float32, label as uint8) pair in (z, y, x) order; ``shape[0]`` is the nominal
    slice count, each case drawing its own within +- 4."""
    z = int(shape[0]) + int(rng.integers(-4, 5))
    h, w = shape[1], shape[2]
    shape = (z, h, w)
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    cy, cx = h / 2 + rng.uniform(-0.03, 0.03) * h, w / 2 + rng.uniform(-0.03, 0.03) * w
    s = rng.uniform(0.85, 1.15)  # patient size
    body_r = (z * 4.0, h * 0.36 * s, w * 0.44 * s)
    body = _ellipsoid(shape, (z / 2, cy, cx), body_r)
    wall = _ellipsoid(shape, (z / 2, cy, cx), (body_r[0], body_r[1] - 4, body_r[2] - 4))
    image[body] = -90.0  # subcutaneous fat
    image[wall] = 45.0   # chest-wall muscle and mediastinum

    # lungs: domes that narrow towards the apex (the top slices), either side of the mediastinum
    for side in (-1, 1):
        lung = _ellipsoid(shape, (z * rng.uniform(0.55, 0.65), cy - h * 0.02, cx + side * w * 0.19 * s),
                          (z * 0.7, h * 0.25 * s, w * 0.15 * s)) & wall
        image[lung] = -850.0 + rng.normal(0, 20)
        label[lung] = 1
    # vessels in the lungs: the top ~4 % of a smoothed random field, blobs of a few voxels, a different
    # pattern per case
    field = gaussian_filter(rng.normal(0, 1, size=shape), sigma=(0.7, 1.2, 1.2))
    image[(field > np.quantile(field, 0.96)) & (label == 1)] = -50.0

    # heart in the lower (caudal) half, left of the midline, with a brighter blood pool
    heart_c = (z * rng.uniform(0.3, 0.4), cy + h * 0.02, cx + w * 0.06)
    heart_r = (z * 0.35, h * 0.15 * s, w * 0.13 * s)
    heart = _ellipsoid(shape, heart_c, heart_r) & wall
    image[heart] = 40.0 + rng.normal(0, 5)
    image[_ellipsoid(shape, heart_c, tuple(r * 0.6 for r in heart_r)) & heart] = 70.0 + rng.normal(0, 5)
    label[heart] = 2
    # descending aorta: a contrast-filled tube left of the spine through every slice
    aorta = _ellipsoid(shape, (z / 2, cy + h * 0.17 * s, cx + w * 0.07), (z * 4.0, h * 0.035, h * 0.035)) & wall
    image[aorta] = 250.0 + rng.normal(0, 20)
    label[aorta] = 3

    # bone, unlabelled: vertebral body (cancellous inside a cortical rim), sternum, ribs along the wall
    spine_c, spine_r = (z / 2, cy + h * 0.27 * s, cx), (z * 4.0, h * 0.06, w * 0.055)
    image[_ellipsoid(shape, spine_c, spine_r)] = 900.0
    image[_ellipsoid(shape, spine_c, (spine_r[0], spine_r[1] - 2, spine_r[2] - 2))] = 250.0
    image[_ellipsoid(shape, (z / 2, cy - h * 0.31 * s, cx), (z * 4.0, h * 0.025, w * 0.05))] = 500.0
    for angle in np.linspace(0.25, np.pi - 0.25, int(rng.integers(5, 8))):
        for side in (-1, 1):
            rib = (z * rng.uniform(0.2, 0.8), cy - np.cos(angle) * (body_r[1] - 6),
                   cx + side * np.sin(angle) * (body_r[2] - 6))
            image[_ellipsoid(shape, rib, (3.0, 2.5, 2.5))] = 700.0  # oblique: on several slices

    # correlated noise: smoothed in-plane only, so each slice keeps its own grain
    noise = gaussian_filter(rng.normal(0, 1, size=shape), sigma=(0, 1.5, 1.5))
    image += (noise * (NOISE_HU / noise.std())).astype(np.float32)
    return image, label


def write_thorax_dataset(raw_folder: str | Path, dataset_id: int = 502, name: str = "SyntheticThorax",
                         num_train: int = 16, num_test: int = 6, shape=(20, 112, 128), spacing_xyz=(0.7, 0.7, 2.0),
                         seed: int = 0, image_io: str = "SimpleITKIO") -> Path:
    """Write ``DatasetXXX_Name`` in nnU-Net raw format (see ``write_nnunet_raw_dataset``); returns it."""
    return write_nnunet_raw_dataset(raw_folder, dataset_id, name, num_train=num_train, num_test=num_test, shape=shape,
                                    spacing_xyz=spacing_xyz, seed=seed, image_io=image_io, make_case=thorax_case,
                                    labels=LABELS, module=__name__)
