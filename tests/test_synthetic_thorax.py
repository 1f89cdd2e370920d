"""The second synthetic CT generator (a thorax): nnU-Net raw files as the demo's, with other anatomy,
sizes and noise."""
from __future__ import annotations

import json

import numpy as np
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_meddinov3.data.synthetic_ct import synthetic_case
from nnunet_meddinov3.data.synthetic_thorax import LABELS, NOISE_HU, thorax_case, write_thorax_dataset


def test_writes_an_nnunet_raw_dataset_of_thoraces(tmp_path):
    folder = write_thorax_dataset(tmp_path, num_train=3, num_test=1, shape=(10, 64, 72))
    dataset = json.loads((folder / "dataset.json").read_text())
    assert folder.name == "Dataset502_SyntheticThorax" and dataset["labels"] == LABELS
    assert dataset["numTraining"] == 3 and "synthetic_thorax" in dataset["description"]
    depths = set()
    for split, cases in (("Tr", range(3)), ("Ts", [3])):
        for i in cases:
            image, props = SimpleITKIO().read_images([str(folder / f"images{split}" / f"case_{i:03d}_0000.nii.gz")])
            label, _ = SimpleITKIO().read_seg(str(folder / f"labels{split}" / f"case_{i:03d}.nii.gz"))
            assert image.shape == label.shape and image.shape[2:] == (64, 72)
            assert 6 <= image.shape[1] <= 14  # the nominal 10 slices +- 4
            depths.add(image.shape[1])
            np.testing.assert_allclose(props["spacing"], (2.0, 0.7, 0.7), rtol=1e-6)
            assert set(np.unique(label)) == {0, 1, 2, 3}
    assert len(depths) > 1  # the slice count varies per case


def test_intensities_are_those_of_the_organs():
    image, label = thorax_case(np.random.default_rng(0), shape=(16, 96, 112))
    # the noise std is NOISE_HU; medians over thousands of voxels sit within a few HU of the set values
    # (the lungs' vessel dots at -50 HU are ~4 % of them, the heart has a 70 HU pool over ~22 % of its volume)
    assert abs(np.median(image[label == 1]) + 850) < 40
    assert 30 < np.median(image[label == 2]) < 80
    assert abs(np.median(image[label == 3]) - 250) < 40
    assert image[0, 0, 0] < -900  # air outside the body
    assert -1000 - 8 * NOISE_HU < image.min() and image.max() < 900 + 8 * NOISE_HU
    assert image.max() > 600  # bone (spine, ribs, sternum), unlabelled
    # correlated noise: neighbouring air voxels agree, where the demo's independent noise does not
    air = image[:, :8, :] + 1000
    assert np.corrcoef(air[:, :, :-1].ravel(), air[:, :, 1:].ravel())[0, 1] > 0.5


def test_differs_from_the_demo_abdomen():
    rng = np.random.default_rng(0)
    thorax, _ = thorax_case(rng)
    abdomen, _ = synthetic_case(rng)
    assert thorax.shape[1:] == (112, 128) and abdomen.shape == (12, 96, 96)
    # air inside the body: the lungs make a quarter or more of the thorax's body voxels, the abdomen has none
    def lung_fraction(volume):
        body = volume > -500
        filled = np.maximum.accumulate(body, axis=2) & np.maximum.accumulate(body[:, :, ::-1], axis=2)[:, :, ::-1]
        return ((volume < -500) & filled).sum() / filled.sum()
    assert lung_fraction(thorax) > 0.2 and lung_fraction(abdomen) < 0.02
    air = abdomen[:, :8, :] + 1000
    assert abs(np.corrcoef(air[:, :, :-1].ravel(), air[:, :, 1:].ravel())[0, 1]) < 0.1
