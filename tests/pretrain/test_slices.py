"""SliceDataset on synthetic NIfTI volumes, an nnU-Net raw dataset and a DICOM series."""

import json
import os

import numpy as np
import pytest
from pretrain_synthetic import DEPTH, EMPTY_SLICES, SIZE, ct_volume

from pretrain.data.intensity import MEDDINOV3_CT
from pretrain.data.slices import Exclusion, SliceDataset, find_volumes

DICOM_UID = "1.2.826.0.1.3680043.2.1125.1.42"
KEPT_PER_VOLUME = DEPTH - len(EMPTY_SLICES)


def roots(ct_sources):
    return [ct_sources["nnunet"], ct_sources["nifti"], ct_sources["dicom"]]


def test_find_volumes_in_each_layout(ct_sources):
    assert [v.key for v in find_volumes(ct_sources["nnunet"])] == [
        "Dataset001_Synth/imagesTr/synth_000",
        "Dataset001_Synth/imagesTr/synth_001",
        "Dataset001_Synth/imagesTs/synth_900",
    ]
    assert [(v.key, v.case_id) for v in find_volumes(ct_sources["nifti"])] == [
        ("plain_nifti/nested/scan_b", "scan_b"),
        ("plain_nifti/scan_a", "scan_a"),
    ]
    (dicom,) = find_volumes(ct_sources["dicom"])
    assert (dicom.key, dicom.case_id, dicom.dicom, len(dicom.files)) == (
        f"dicom/patient1/{DICOM_UID}",
        DICOM_UID,
        True,
        DEPTH,
    )


def test_index_slices_and_values(ct_sources, tmp_path):
    ds = SliceDataset(roots(ct_sources), tmp_path / "cache")
    assert ds.index["n_volumes"] == 6 and len(ds) == 6 * KEPT_PER_VOLUME
    assert {ds.slice_location(i)[1] for i in range(len(ds))} == set(range(1, DEPTH - 1))  # empty slices skipped
    assert json.loads(ds.index_path.read_text()) == ds.index
    assert ds.index["config"]["preset"] == MEDDINOV3_CT.to_dict()

    item = ds[0]
    assert item.dtype == np.float32 and item.shape == (SIZE, SIZE)
    low, high = MEDDINOV3_CT.output_range()
    assert low - 1e-5 <= item.min() and item.max() <= high + 1e-5

    # CT is cached as int16 HU; the DICOM series reads back exactly as written
    (dicom,) = [v for v in ds.volumes if v["case_id"] == DICOM_UID]
    cached = np.load(ds.cache_dir / dicom["cache_file"], mmap_mode="r")
    assert cached.dtype == np.int16
    np.testing.assert_array_equal(cached, ct_volume(5))
    i = next(i for i in range(len(ds)) if ds.slice_location(i) == (dicom["key"], 3))
    np.testing.assert_allclose(ds[i], MEDDINOV3_CT.apply(ct_volume(5)[3]), rtol=1e-6)


def test_in_plane_resampling(ct_sources, tmp_path):
    ds = SliceDataset([ct_sources["nifti"]], tmp_path / "cache", target_spacing=(1.6, 1.6), cache_dtype="float32")
    volume = ds.volumes[0]
    assert volume["original_shape"] == [DEPTH, SIZE, SIZE] and volume["shape"] == [DEPTH, SIZE // 2, SIZE // 2]
    np.testing.assert_allclose(volume["spacing"], [3.0, 1.6, 1.6])
    np.testing.assert_allclose(volume["original_spacing"], [3.0, 0.8, 0.8])
    assert ds[0].shape == (SIZE // 2, SIZE // 2)
    # the body stays centred: linear resampling keeps the field of view
    cached = np.load(ds.cache_dir / volume["cache_file"])
    assert cached.dtype == np.float32 and cached[:, 16, 16].max() > -100 and cached[:, 0, 0].max() == -1000


def test_body_mask_threshold_is_configurable(ct_sources, tmp_path):
    keep_all = SliceDataset([ct_sources["nifti"]], tmp_path / "all", body_threshold=None)
    assert len(keep_all) == 2 * DEPTH
    too_strict = SliceDataset([ct_sources["nifti"]], tmp_path / "strict", min_body_fraction=0.9)
    assert len(too_strict) == 0


def test_exclusions_are_recorded_and_change_the_manifest(ct_sources, tmp_path):
    everything = SliceDataset(roots(ct_sources), tmp_path / "cache")
    assert everything.excluded == []

    test_images = Exclusion.from_nnunet_test_images(ct_sources["nnunet"])
    assert test_images.case_ids == {"synth_900"}
    no_test = SliceDataset(roots(ct_sources), tmp_path / "cache", exclude=test_images)
    assert no_test.excluded == [{"key": "Dataset001_Synth/imagesTs/synth_900", "case_id": "synth_900"}]
    assert no_test.index["exclusion"]["case_ids"] == ["synth_900"]
    assert "imagesTs" in no_test.index["exclusion"]["origins"][0]
    assert len(no_test) == len(everything) - KEPT_PER_VOLUME
    assert no_test.manifest_sha256 != everything.manifest_sha256

    guard = test_images | Exclusion.from_nnunet_split(ct_sources["nnunet"] / "splits_final.json", fold=0)
    guard = guard | Exclusion.from_case_ids([DICOM_UID, "plain_nifti/scan_a"])
    guarded = SliceDataset(roots(ct_sources), tmp_path / "cache", exclude=guard)
    assert sorted(e["case_id"] for e in guarded.excluded) == sorted(["synth_900", "synth_001", DICOM_UID, "scan_a"])
    assert len(guarded.index["exclusion"]["origins"]) == 3
    assert {v["case_id"] for v in guarded.volumes} == {"synth_000", "scan_b"}

    # the manifest covers the exclusion list itself, also ids that match nothing
    unmatched = SliceDataset(roots(ct_sources), tmp_path / "cache", exclude=Exclusion.from_case_ids(["other"]))
    assert unmatched.excluded == [] and len(unmatched) == len(everything)
    assert unmatched.manifest_sha256 != everything.manifest_sha256
    assert SliceDataset(roots(ct_sources), tmp_path / "cache").manifest_sha256 == everything.manifest_sha256


def test_cache_is_reused(ct_sources, tmp_path):
    first = SliceDataset(roots(ct_sources), tmp_path / "cache")
    assert not first.reused_cache
    files = sorted((tmp_path / "cache" / "volumes").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]

    second = SliceDataset(roots(ct_sources), tmp_path / "cache")
    assert second.reused_cache
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert second.index == first.index
    np.testing.assert_array_equal(second[7], first[7])

    # a changed setting rebuilds the cache
    assert not SliceDataset(roots(ct_sources), tmp_path / "cache", min_body_fraction=0.06).reused_cache


def test_changed_source_file_is_read_again(ct_sources, tmp_path):
    nifti = ct_sources["nifti"] / "scan_a.nii.gz"
    SliceDataset([ct_sources["nifti"]], tmp_path / "cache")
    stat = nifti.stat()
    os.utime(nifti, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        again = SliceDataset([ct_sources["nifti"]], tmp_path / "cache")
        assert not again.reused_cache
    finally:
        os.utime(nifti, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_duplicate_roots_are_rejected(ct_sources, tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        SliceDataset([ct_sources["nifti"], ct_sources["nifti"]], tmp_path / "cache")


def test_from_index_reuses_the_built_dataset_without_scanning_or_writing(ct_sources, tmp_path, monkeypatch):
    built = SliceDataset(roots(ct_sources), tmp_path / "cache", exclude=Exclusion.from_case_ids(["synth_900"]))
    written = built.index_path.read_bytes()
    mtime = built.index_path.stat().st_mtime_ns

    import pretrain.data.slices as slices_module

    def no_scan(root):
        raise AssertionError("from_index must not scan the data")

    monkeypatch.setattr(slices_module, "find_volumes", no_scan)
    index = json.loads(json.dumps(built.index))  # as another process receives it
    other = SliceDataset.from_index(index, tmp_path / "cache", MEDDINOV3_CT)
    assert built.index_path.read_bytes() == written and built.index_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["index.json", "volumes"]
    assert len(other) == len(built) and other.manifest_sha256 == built.manifest_sha256
    assert other.excluded == built.excluded and other.exclusion == built.exclusion
    assert [other.slice_location(i) for i in range(len(other))] == [built.slice_location(i) for i in range(len(built))]
    np.testing.assert_array_equal(other[5], built[5])

    with pytest.raises(ValueError, match="intensity preset"):
        SliceDataset.from_index(index, tmp_path / "cache", type(MEDDINOV3_CT)(window=(-100.0, 100.0)))


def test_each_write_has_its_own_temporary_file(ct_sources, tmp_path, monkeypatch):
    import pretrain.data.slices as slices_module

    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renamed.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(slices_module.os, "replace", recording_replace)
    for cache in ("a", "b"):  # two writers of the same index and volume file names
        SliceDataset([ct_sources["nifti"]], tmp_path / cache)
    temporaries = [src for src, _ in renamed]
    assert len(renamed) == 2 * 3 and len(set(temporaries)) == len(temporaries)  # 2 volumes + index, twice
    assert [dst for _, dst in renamed].count("index.json") == 2
    assert all(src.startswith(dst + ".") and src.endswith(".tmp") for src, dst in renamed)
    # nothing is left behind, also when a write fails
    def failing_save(file, array):
        file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(slices_module.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        SliceDataset([ct_sources["nifti"]], tmp_path / "c")
    assert list((tmp_path / "c" / "volumes").iterdir()) == []
