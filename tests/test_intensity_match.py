"""Fine-tuning sees the intensities the weights were pretrained on (issue 10, item 5).

nnU-Net's CTNormalization computes the CT preset's formula, so the planner writes the weights' window
and statistics into the plans, and pretraining can adopt a dataset's nnU-Net numbers; the tests run
nnU-Net's own normalisation classes and preprocessing, not a re-implementation.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_meddinov3.data.intensity import (
    MEDDINOV3_CT,
    CTIntensity,
    ct_preset_from_nnunet,
    mri_preset_like_nnunet_zscore,
    nnunet_ct_properties,
)
from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset


def test_nnunet_ct_normalization_computes_the_ct_preset():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
        ZScoreNormalization,
    )

    image = np.random.default_rng(0).normal(0, 700, (2, 16, 16)).astype(np.float32)
    for preset in (MEDDINOV3_CT, CTIntensity(window=(-160.0, 240.0), mean=40.0, std=80.0)):
        nnunet = CTNormalization(use_mask_for_norm=False, intensityproperties=nnunet_ct_properties(preset))
        np.testing.assert_allclose(nnunet.run(image.copy()), preset.apply(image), rtol=0, atol=1e-6)
        assert ct_preset_from_nnunet(nnunet_ct_properties(preset)) == preset
    zscore = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={})
    np.testing.assert_allclose(zscore.run(image.copy()), mri_preset_like_nnunet_zscore().apply(image), atol=1e-5)
    with pytest.raises(ValueError, match="percentile_99_5"):
        ct_preset_from_nnunet({"percentile_00_5": 0, "mean": 1, "std": 2})


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("intensity")
    write_nnunet_raw_dataset(root / "raw", 511, num_train=4, num_test=1, shape=(3, 64, 64))
    return dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
                nnUNet_results=str(root / "res"), nnUNet_def_n_proc="1"), root


def _plan(env, root, *extra, plans_name):
    proc = subprocess.run(["meddinov3", "plan_and_preprocess", "-d", "511", "-c", "2d", "-np", "1",
                           "--target-patch", "0", "--plans-name", plans_name, *extra],
                          env=env, cwd=root, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plans = json.loads((root / "pre" / "Dataset511_SyntheticCT" / f"{plans_name}.json").read_text())
    return proc.stdout, plans


def test_planner_matches_the_weights_convention_and_nnunet_preprocesses_with_it(nnunet_env):
    env, root = nnunet_env
    out, plans = _plan(env, root, "--intensity-from", "meddinov3-vitb16-ct3m", plans_name="nnUNetPlansMedDINOv3")
    assert plans["foreground_intensity_properties_per_channel"]["0"] == nnunet_ct_properties(MEDDINOV3_CT)
    record = plans["meddinov3_intensity"]
    assert record["weights"] == "meddinov3-vitb16-ct3m" and record["channels"]["CT"].startswith("matched")
    assert record["dataset_properties"]["0"]["std"] < 100  # the dataset's own numbers stay on record
    assert "intensity of channel 'CT': matched" in out

    # nnU-Net's own preprocessing (no resampling in-plane, no crop of air) wrote the preset's values
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = root / "pre" / "Dataset511_SyntheticCT" / "nnUNetPlansMedDINOv3_2d"
    data, *_ = infer_dataset_class(str(folder))(str(folder), ["case_000"]).load_case("case_000")
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "raw" / "Dataset511_SyntheticCT" / "imagesTr" /
                                                     "case_000_0000.nii.gz"))).astype(np.float32)
    np.testing.assert_allclose(np.asarray(data[0]), MEDDINOV3_CT.apply(raw), atol=1e-4)


@pytest.fixture(scope="module")
def default_plans(nnunet_env):
    """Planned with the defaults: nnU-Net's dataset statistics, as in the paper's fine-tuning."""
    env, root = nnunet_env
    _, plans = _plan(env, root, "--no-preprocess", plans_name="nnUNetPlansMDV3_own")
    return root / "pre" / "Dataset511_SyntheticCT" / "nnUNetPlansMDV3_own.json", plans


def test_planner_keeps_nnunet_statistics_by_default_or_when_nothing_matches(nnunet_env, default_plans, tmp_path):
    env, root = nnunet_env
    _, plans = default_plans
    fingerprint = json.loads((root / "pre" / "Dataset511_SyntheticCT" / "dataset_fingerprint.json").read_text())
    assert plans["foreground_intensity_properties_per_channel"]["0"] == \
        fingerprint["foreground_intensity_properties_per_channel"]["0"]
    assert plans["meddinov3_intensity"]["channels"]["CT"].startswith("nnU-Net's own")

    # natural-image weights (ImageNet convention) cannot be expressed by CTNormalization: said, not hidden
    out, plans = _plan(env, root, "--intensity-from", "dinov3-vitb16-lvd1689m", "--no-preprocess",
                       plans_name="nnUNetPlansMDV3_lvd")
    assert plans["foreground_intensity_properties_per_channel"]["0"]["std"] < 100
    assert "not matched" in plans["meddinov3_intensity"]["channels"]["CT"] and "imagenet" in out

    proc = subprocess.run(["meddinov3", "plan_and_preprocess", "-d", "511", "--no-preprocess",
                           "--intensity-from", str(tmp_path / "missing.safetensors")],
                          env=env, cwd=root, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--intensity-from none" in proc.stderr
    assert "missing.safetensors" in proc.stderr and "U-Net configuration" not in proc.stdout  # before planning


def test_pretraining_adopts_the_normalisation_of_nnunet_plans(default_plans, tmp_path):
    from pretrain.configs import ConfigError, load_config

    plans_file, _ = default_plans
    properties = json.loads(plans_file.read_text())["foreground_intensity_properties_per_channel"]["0"]
    config = load_config("tiny_stage1", ["data.intensity.kind=nnunet", f"data.intensity.plans={plans_file}"])
    # plain numbers in the run's config (and so in its checkpoints and export), equal to nnU-Net's
    assert config.data.intensity == ct_preset_from_nnunet(properties).to_dict()

    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["normalization_schemes"] = ["ZScoreNormalization"]
    plans["configurations"]["2d"]["use_mask_for_norm"] = [False]
    (tmp_path / "z.json").write_text(json.dumps(plans))
    config = load_config("tiny_stage1", ["data.intensity.kind=nnunet", f"data.intensity.plans={tmp_path / 'z.json'}"])
    assert config.data.intensity == {"kind": "mri", "percentiles": [0.0, 100.0]}

    plans["configurations"]["2d"]["use_mask_for_norm"] = [True]
    (tmp_path / "masked.json").write_text(json.dumps(plans))
    for overrides, message in (
            ([f"data.intensity.plans={tmp_path / 'masked.json'}"], "inside the foreground mask"),
            ([f"data.intensity.plans={plans_file}", "data.intensity.channel=2"], "out of range"),
            ([f"data.intensity.plans={tmp_path / 'missing.json'}"], "cannot read nnU-Net plans"),
            ([], "takes data.intensity.plans=PATH")):
        with pytest.raises(ConfigError, match=message):
            load_config("tiny_stage1", ["data.intensity.kind=nnunet", *overrides])
