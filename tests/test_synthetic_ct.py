"""The synthetic CT writer: the same volumes whichever nnU-Net reader the files are written for."""
from __future__ import annotations

import json

import numpy as np
import pytest
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset


def test_nibabel_files_read_back_as_the_simpleitk_files(tmp_path):
    # an anisotropic, non-cubic volume so that any swapped axis or spacing shows
    sitk_folder = write_nnunet_raw_dataset(tmp_path / "a", 5, num_train=1, num_test=1, shape=(5, 16, 24),
                                           spacing_xyz=(0.7, 0.9, 2.5))
    nib_folder = write_nnunet_raw_dataset(tmp_path / "b", 5, num_train=1, num_test=1, shape=(5, 16, 24),
                                          spacing_xyz=(0.7, 0.9, 2.5), image_io="NibabelIO")
    for image, label in (("imagesTr/case_000_0000.nii.gz", "labelsTr/case_000.nii.gz"),
                         ("imagesTs/case_001_0000.nii.gz", "labelsTs/case_001.nii.gz")):
        a, a_props = SimpleITKIO().read_images([str(sitk_folder / image)])
        b, b_props = NibabelIO().read_images([str(nib_folder / image)])
        assert a.shape == b.shape == (1, 5, 16, 24)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a_props["spacing"], b_props["spacing"], rtol=1e-6)
        np.testing.assert_allclose(b_props["spacing"], (2.5, 0.9, 0.7), rtol=1e-6)
        np.testing.assert_array_equal(SimpleITKIO().read_seg(str(sitk_folder / label))[0],
                                      NibabelIO().read_seg(str(nib_folder / label))[0])
    assert "overwrite_image_reader_writer" not in json.loads((sitk_folder / "dataset.json").read_text())
    assert json.loads((nib_folder / "dataset.json").read_text())["overwrite_image_reader_writer"] == "NibabelIO"


def test_unknown_reader_is_refused(tmp_path):
    with pytest.raises(ValueError, match="SimpleITKIO, NibabelIO"):
        write_nnunet_raw_dataset(tmp_path, 5, num_train=1, num_test=0, image_io="TiffIO")
