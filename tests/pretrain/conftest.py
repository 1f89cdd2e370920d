"""Fixtures of the pretraining tests: synthetic CT sources in every supported layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pretrain_synthetic import ct_volume, write_dicom_series, write_nifti


@pytest.fixture(scope="session")
def ct_sources(tmp_path_factory) -> dict[str, Path]:
    """An nnU-Net raw dataset (2 imagesTr, 1 imagesTs case, splits_final.json), a NIfTI folder
    (1 .nii.gz, 1 .nii) and a folder with one DICOM series."""
    root = tmp_path_factory.mktemp("sources")
    nnunet = root / "Dataset001_Synth"
    write_nifti(nnunet / "imagesTr" / "synth_000_0000.nii.gz", ct_volume(0))
    write_nifti(nnunet / "imagesTr" / "synth_001_0000.nii.gz", ct_volume(1))
    write_nifti(nnunet / "imagesTs" / "synth_900_0000.nii.gz", ct_volume(2))
    (nnunet / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "channel_names": {"0": "CT"}}))
    splits = [{"train": ["synth_000"], "val": ["synth_001"]}, {"train": ["synth_001"], "val": ["synth_000"]}]
    (nnunet / "splits_final.json").write_text(json.dumps(splits))

    nifti = root / "plain_nifti"
    write_nifti(nifti / "scan_a.nii.gz", ct_volume(3))
    write_nifti(nifti / "nested" / "scan_b.nii", ct_volume(4))

    dicom = root / "dicom"
    write_dicom_series(dicom / "patient1", ct_volume(5), "1.2.826.0.1.3680043.2.1125.1.42")
    return {"nnunet": nnunet, "nifti": nifti, "dicom": dicom}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # two contended cores: one intra-op thread is several times faster for these tiny matrices. The variable
    # too, so that training's free-core rule (nnunet_meddinov3/cpu_threads.py) leaves the count alone: module
    # fixtures train as well (teachers, reference runs), and a run compared bit for bit with another must
    # compute with the same threads. Module scope, so it is in force before those fixtures.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
