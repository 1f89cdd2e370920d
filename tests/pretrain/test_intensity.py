"""Intensity presets: values, dict round trip, per-volume MRI statistics."""

import json

import numpy as np
import pytest

from pretrain.data.intensity import MEDDINOV3_CT, CTIntensity, MRIntensity, preset_from_dict


def test_meddinov3_ct_values():
    hu = np.array([-3000.0, -1000.0, 0.0, 65.1084, 1000.0, 3000.0])
    out = MEDDINOV3_CT.apply(hu)
    expected = (np.clip(hu, -1000, 1000) - 65.1084) / 178.0166
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out[3] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(MEDDINOV3_CT.output_range(), (expected[0], expected[-1]), rtol=1e-6)


@pytest.mark.parametrize("preset", [MEDDINOV3_CT, CTIntensity(window=(-160, 240), mean=40, std=100), MRIntensity()])
def test_dict_round_trip_is_plain_json(preset):
    d = json.loads(json.dumps(preset.to_dict()))
    assert preset_from_dict(d) == preset


def test_unknown_preset_kind():
    with pytest.raises(ValueError):
        preset_from_dict({"kind": "pet"})


def test_mri_percentile_clip_and_zscore_per_volume():
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 100.0, size=(6, 32, 32)).astype(np.float32)
    volume[0, 0, 0] = 1e6  # outlier, clipped at the 99.5th percentile
    preset = MRIntensity()
    out = preset.apply(volume)
    assert out.mean() == pytest.approx(0.0, abs=1e-4) and out.std() == pytest.approx(1.0, abs=1e-4)
    low, high = np.percentile(volume, [0.5, 99.5])
    clipped = volume.clip(low, high)
    assert out.max() == pytest.approx((high - clipped.mean()) / clipped.std(), rel=1e-4)
    # a slice normalised with its volume's statistics equals the slice of the normalised volume
    stats = preset.volume_stats(volume)
    np.testing.assert_allclose(preset.apply(volume[3], stats), out[3], rtol=1e-5, atol=1e-6)


def test_a_preset_with_a_missing_or_bad_field_is_named_as_such():
    with pytest.raises(ValueError, match=r"needs \['mean', 'std', 'window'\], missing \['window'\]"):
        preset_from_dict({"kind": "ct", "mean": 0.0, "std": 1.0})
    with pytest.raises(ValueError, match="std must be a positive number"):
        preset_from_dict({"kind": "ct", "window": [-1000, 1000], "mean": 0.0, "std": 0.0})
