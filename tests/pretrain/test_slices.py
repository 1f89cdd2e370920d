"""SliceDataset on synthetic NIfTI volumes, an nnU-Net raw dataset and a DICOM series."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
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

    # CT is cached as int16 HU, only the kept slices; the DICOM series reads back exactly as written
    (dicom,) = [v for v in ds.volumes if v["case_id"] == DICOM_UID]
    assert dicom["slices"] == list(range(1, DEPTH - 1))
    for k in dicom["slices"]:
        i = next(i for i in range(len(ds)) if ds.slice_location(i) == (dicom["key"], k))
        assert ds.raw_slice(i).dtype == np.int16
        np.testing.assert_array_equal(ds.raw_slice(i), ct_volume(5)[k])
        np.testing.assert_allclose(ds[i], MEDDINOV3_CT.apply(ct_volume(5)[k]), rtol=1e-6)


def test_in_plane_resampling(ct_sources, tmp_path):
    ds = SliceDataset([ct_sources["nifti"]], tmp_path / "cache", target_spacing=(1.6, 1.6), cache_dtype="float32")
    volume = ds.volumes[0]
    assert volume["original_shape"] == [DEPTH, SIZE, SIZE] and volume["shape"] == [DEPTH, SIZE // 2, SIZE // 2]
    np.testing.assert_allclose(volume["spacing"], [3.0, 1.6, 1.6])
    np.testing.assert_allclose(volume["original_spacing"], [3.0, 0.8, 0.8])
    assert ds[0].shape == (SIZE // 2, SIZE // 2)
    # the body stays centred: linear resampling keeps the field of view
    cached = np.stack([ds.raw_slice(i) for i in range(len(volume["slices"]))])
    assert cached.dtype == np.float32 and cached[:, 16, 16].max() > -100 and cached[:, 0, 0].max() == -1000
    # slice by slice, the grid of resampling the volume's two in-plane axes at once
    image = sitk.ReadImage(str(ct_sources["nifti"] / "nested" / "scan_b.nii"), sitk.sitkFloat32)
    whole = sitk.GetArrayFromImage(_resample_volume_in_plane(image, (1.6, 1.6)))[volume["slices"]]
    np.testing.assert_allclose(cached, whole, atol=1e-3)


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
    files = sorted((first.cache_dir / "volumes").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]

    second = SliceDataset(roots(ct_sources), tmp_path / "cache")
    assert second.reused_cache
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert second.index == first.index
    np.testing.assert_array_equal(second[7], first[7])

    # a changed setting builds another cache beside it, in the same folder; both stay usable
    other = SliceDataset(roots(ct_sources), tmp_path / "cache", min_body_fraction=0.06)
    assert not other.reused_cache and other.cache_dir != first.cache_dir
    assert other.cache_dir.parent == first.cache_dir.parent
    assert SliceDataset(roots(ct_sources), tmp_path / "cache").reused_cache
    assert SliceDataset(roots(ct_sources), tmp_path / "cache", min_body_fraction=0.06).reused_cache


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
    listing = sorted(p.name for p in built.cache_dir.rglob("*"))
    written = built.index_path.read_bytes()
    mtime = built.index_path.stat().st_mtime_ns

    import pretrain.data.cache_build as build_module

    def no_scan(root, series_cache=None):
        raise AssertionError("from_index must not scan the data")

    monkeypatch.setattr(build_module, "find_volumes", no_scan)
    index = json.loads(json.dumps(built.index))  # as another process receives it
    other = SliceDataset.from_index(index, tmp_path / "cache", MEDDINOV3_CT)
    assert built.index_path.read_bytes() == written and built.index_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in built.cache_dir.rglob("*")) == listing
    assert len(other) == len(built) and other.manifest_sha256 == built.manifest_sha256
    assert other.excluded == built.excluded and other.exclusion == built.exclusion
    assert [other.slice_location(i) for i in range(len(other))] == [built.slice_location(i) for i in range(len(built))]
    np.testing.assert_array_equal(other[5], built[5])

    with pytest.raises(ValueError, match="intensity preset"):
        SliceDataset.from_index(index, tmp_path / "cache", type(MEDDINOV3_CT)(window=(-100.0, 100.0)))


def test_each_write_has_its_own_temporary_file(ct_sources, tmp_path, monkeypatch):
    import nnunet_meddinov3.durable_files as atomic_module
    import pretrain.data.slice_store as store_module

    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renamed.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", recording_replace)
    monkeypatch.setattr(store_module.os, "replace", recording_replace)
    for cache in ("a", "b"):  # two writers of the same file names
        SliceDataset([ct_sources["nifti"]], tmp_path / cache)
    temporaries = [src for src, _ in renamed]
    # per cache: settings, 2 volumes and their 2 records, the index, the DICOM series list (empty)
    assert len(set(temporaries)) == len(temporaries) == 2 * 6
    assert sum(dst.startswith("index-") for _, dst in renamed) == 2
    assert all(src.startswith(dst + ".") and src.endswith(".tmp") for src, dst in renamed)

    # nothing is left behind, also when a write fails
    def failing_compress(plane):
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "_compress", failing_compress)
    with pytest.raises(OSError, match="disk full"):
        SliceDataset([ct_sources["nifti"]], tmp_path / "c")
    assert [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != "settings.json"] == []


def _resample_volume_in_plane(image: sitk.Image, spacing: tuple[float, float]) -> sitk.Image:
    """The volume resampled at once (the old cache's way), for comparison with the slice-wise one."""
    old = np.array(image.GetSpacing())
    new = np.array([spacing[1], spacing[0], old[2]])
    size = [int(s) for s in np.maximum(1, np.round(np.array(image.GetSize()) * old / new))]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new - old) / 2)
    air = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), new.tolist(),
                         image.GetDirection(), air)
