"""Synthetic CT-like volumes in nnU-Net raw format, for the demo, the tests and pretraining tests.

Each case is a body ellipse of soft tissue (HU ~ 30) in air (-1000) with a subcutaneous fat rim
(-100), a spine (bone, ~700 HU) that is not labelled, and three labelled organ-like ellipsoids whose
position, size and contrast vary per case: 1 liver (~60 HU, large), 2 kidneys (~150 HU, a pair),
3 spleen (~45 HU, close to the liver's contrast on purpose). Spacing is anisotropic like an
abdominal CT (fine in-plane, thick slices), with Gaussian noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}


def _ellipsoid(shape, center, radii) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    return (((zz - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2
            + ((xx - center[2]) / radii[2]) ** 2) <= 1.0


def synthetic_case(rng: np.random.Generator, shape=(12, 96, 96)) -> tuple[np.ndarray, np.ndarray]:
    """One (image in HU as float32, label as uint8) pair, arrays in (z, y, x) order."""
    z, h, w = shape
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    cy, cx = h / 2 + rng.uniform(-0.04, 0.04) * h, w / 2 + rng.uniform(-0.04, 0.04) * w
    body_r = (z * 4.0, h * rng.uniform(0.34, 0.4), w * rng.uniform(0.42, 0.47))
    body = _ellipsoid(shape, (z / 2, cy, cx), body_r)
    inner = _ellipsoid(shape, (z / 2, cy, cx), (body_r[0], body_r[1] - 3, body_r[2] - 3))
    image[body] = -100.0
    image[inner] = 30.0

    def organ(value, center, radii, cls=None):
        mask = _ellipsoid(shape, center, radii) & inner
        image[mask] = value + rng.normal(0, 5)
        if cls is not None:
            label[mask] = cls

    s = rng.uniform(0.8, 1.2)  # patient size
    organ(60, (z / 2 + rng.uniform(-1, 1), cy - h * 0.08, cx - w * 0.16),
          (z * 0.45, h * 0.17 * s, w * 0.2 * s), cls=1)
    organ(45, (z / 2 + rng.uniform(-1, 1), cy - h * 0.1, cx + w * 0.22),
          (z * 0.3, h * 0.09 * s, w * 0.07 * s), cls=3)
    for side in (-1, 1):
        organ(150, (z / 2 + rng.uniform(-1, 1), cy + h * 0.1, cx + side * w * 0.13),
              (z * 0.3, h * 0.07 * s, w * 0.045 * s), cls=2)
    organ(700, (z / 2, cy + h * 0.23, cx), (z * 4.0, h * 0.05, w * 0.05))  # spine, unlabelled
    image += rng.normal(0, 15, size=shape).astype(np.float32)
    return image, label


IMAGE_IO = ("SimpleITKIO", "NibabelIO")  # nnU-Net reader/writer classes the files can be written for


def write_image(array: np.ndarray, path: Path, spacing_xyz, image_io: str) -> None:
    """``array`` in (z, y, x) order as NIfTI, read back by nnU-Net's ``image_io`` in that same order."""
    if image_io == "NibabelIO":
        import nibabel

        # NibabelIO transposes what it reads to SimpleITK's (z, y, x) and reverses the affine's spacing to match
        affine = np.diag([*(float(s) for s in spacing_xyz), 1.0])
        nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), str(path))
        return
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(img, str(path))


def write_nnunet_raw_dataset(raw_folder: str | Path, dataset_id: int = 501, name: str = "SyntheticCT",
                             num_train: int = 12, num_test: int = 4, shape=(12, 96, 96),
                             spacing_xyz=(0.8, 0.8, 2.5), seed: int = 0, image_io: str = "SimpleITKIO",
                             make_case=synthetic_case, labels: dict | None = None, module: str = __name__) -> Path:
    """Write ``DatasetXXX_Name`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json); returns it.
    ``image_io="NibabelIO"`` writes with nibabel and tells nnU-Net to read with its NibabelIO (for a machine
    without SimpleITK). ``make_case(rng, shape)`` makes each (image, label) pair and ``labels`` names its classes
    (default: this module's abdomen); another generator (``synthetic_thorax``) passes its own, and its
    ``module`` name for the description."""
    if image_io not in IMAGE_IO:
        raise ValueError(f"image_io must be one of {', '.join(IMAGE_IO)}, not {image_io!r}")
    folder = Path(raw_folder) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_train + num_test):
        image, label = make_case(rng, shape)
        split = "Tr" if i < num_train else "Ts"
        case = f"case_{i:03d}"
        write_image(image.round().astype(np.int16), folder / f"images{split}" / f"{case}_0000.nii.gz", spacing_xyz,
               image_io)
        write_image(label, folder / f"labels{split}" / f"{case}.nii.gz", spacing_xyz, image_io)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": LABELS if labels is None else labels,
                    "numTraining": num_train, "file_ending": ".nii.gz", "name": name,
                    "description": f"synthetic CT-like volumes written by {module}"}
    if image_io != "SimpleITKIO":
        dataset_json["overwrite_image_reader_writer"] = image_io
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder
