"""The slice cache at scale: bad volumes skipped and named, per-volume resume after kill -9, damaged
files rebuilt, shares built by several processes, DICOM series lists kept."""

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from pretrain_synthetic import DEPTH, EMPTY_SLICES, ct_volume, write_nifti

from pretrain.data.slice_store import CacheDamaged
from pretrain.data.slices import DataError, SliceDataset, find_volumes

KEPT = DEPTH - len(EMPTY_SLICES)


@pytest.fixture
def good_root(tmp_path):
    root = tmp_path / "good"
    for i in range(3):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(30 + i))
    return root


def _bad_volumes(root):
    """One file per way a volume can be unusable, and the words its reason must contain."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.nii.gz").write_bytes(b"")
    (root / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(4000))
    whole = write_nifti(root / "whole.nii.gz", ct_volume(40)).read_bytes()
    (root / "whole.nii.gz").unlink()
    (root / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    plain = write_nifti(root / "plain.nii", ct_volume(41)).read_bytes()
    (root / "plain.nii").unlink()
    (root / "cut_plain.nii").write_bytes(plain[: len(plain) - 3000])
    nan = ct_volume(42).astype(np.float32)
    nan[3, 10, 10] = np.nan
    write_nifti(root / "nan.nii.gz", nan)
    write_nifti(root / "inf.nii", np.full(ct_volume(43).shape, np.inf, np.float32))
    sitk.WriteImage(sitk.Image([8, 8, 4, 2], sitk.sitkInt16), str(root / "fourd.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(root / "rgb.nii.gz"))
    return {"empty": "unreadable", "garbage": "unreadable", "cut": "truncated", "cut_plain": "truncated",
            "nan": "1 NaN or infinite", "inf": "NaN or infinite", "fourd": "4D", "rgb": "3 components"}


def test_bad_volumes_are_skipped_and_named(good_root, tmp_path, caplog):
    expected = _bad_volumes(good_root)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        ds = SliceDataset([good_root], tmp_path / "cache")
    assert ds.index["n_volumes"] == 3 and len(ds) == 3 * KEPT
    reasons = {v["key"].split("/")[-1]: v["error"] for v in ds.skipped}
    assert reasons.keys() == expected.keys()
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
        assert any(name in r.message and words in r.message for r in caplog.records), name
    report = json.loads(ds.index_path.with_suffix(".skipped.json").read_text())
    assert {r["key"].split("/")[-1]: r["reason"] for r in report} == reasons
    assert all(len(r["files"]) == 1 for r in report)

    # the bad ones are remembered: nothing is read again while their files stay as they are
    again = SliceDataset([good_root], tmp_path / "cache")
    assert again.reused_cache and again.skipped == ds.skipped


def test_the_build_fails_only_when_nothing_usable_remains(tmp_path):
    _bad_volumes(tmp_path / "bad")
    with pytest.raises(DataError, match=r"none of the 8 volume\(s\).*can be used.*skipped.json"):
        SliceDataset([tmp_path / "bad"], tmp_path / "cache")


def test_a_gzip_file_of_several_members_is_not_mistaken_for_a_cut_one(tmp_path):
    whole = write_nifti(tmp_path / "one.nii.gz", ct_volume(44)).read_bytes()
    raw = gzip.decompress(whole)
    (tmp_path / "one.nii.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    ds = SliceDataset([tmp_path], tmp_path / "cache")
    assert ds.skipped == [] and len(ds) == KEPT


def _cache_command(root, cache, *extra):
    return [sys.executable, "-m", "pretrain", "cache", "--config", "tiny_stage1", "--data", str(root),
            "--cache-dir", str(cache), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def test_kill_9_mid_build_loses_only_the_volume_in_flight(tmp_path):
    root = tmp_path / "data"
    for i in range(4):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(50 + i))
    cache = tmp_path / "cache"
    process = subprocess.Popen(_cache_command(root, cache, "debug.cache_build_delay_s=1.5"), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while not list(cache.glob("*/records/*.json")):
            assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
            time.sleep(0.02)
        while not list(cache.glob("*/volumes/*.tmp")):  # the next volume is being written
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stdout.close()
    done = len(list(cache.glob("*/records/*.json")))
    assert 1 <= done < 4 and list(cache.glob("*/volumes/*.tmp")) and not list(cache.glob("*/index-*"))

    ds = SliceDataset([root], cache)
    assert ds.build_stats.built == 4 - done and len(ds) == 4 * KEPT
    assert not list(cache.rglob("*.tmp"))  # the killed writer's temporary file is gone
    fresh = SliceDataset([root], tmp_path / "fresh")
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.raw_slice(i), fresh.raw_slice(i))


def test_damaged_cache_files_are_detected_and_rebuilt(good_root, tmp_path, caplog):
    ds = SliceDataset([good_root], tmp_path / "cache")
    reference = [ds.raw_slice(i).copy() for i in range(len(ds))]
    files = [ds.cache_dir / v["cache_file"] for v in ds.volumes]

    files[0].write_bytes(files[0].read_bytes()[:-10])  # cut short
    files[1].write_bytes(np.random.default_rng(1).bytes(files[1].stat().st_size))  # same size, garbage
    ds.index_path.write_text(ds.index_path.read_text()[:100])  # a cut index: rebuilt from the records
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        again = SliceDataset([good_root], tmp_path / "cache")
    assert again.build_stats.built == 2 and len(again.build_stats.damaged) == 2
    assert any("unreadable" in r.message and "index-" in r.message for r in caplog.records)
    for i, expected in enumerate(reference):
        np.testing.assert_array_equal(again.raw_slice(i), expected)

    # a damaged slice inside an intact-looking file: an error naming the file when read ...
    data = bytearray(files[2].read_bytes())
    data[20] ^= 0xFF
    files[2].write_bytes(bytes(data))
    stale = SliceDataset([good_root], tmp_path / "cache")  # size and table intact: not noticed at start
    assert stale.build_stats.built == 0
    first_of_last = 2 * KEPT
    with pytest.raises(CacheDamaged, match=files[2].name):
        stale.raw_slice(first_of_last)
    # ... and `cache --verify` finds and rebuilds it
    verified = SliceDataset([good_root], tmp_path / "cache", verify=True)
    assert verified.build_stats.built == 1
    np.testing.assert_array_equal(verified.raw_slice(first_of_last), reference[first_of_last])

    # a cut record: that volume alone is built again
    record = next((verified.cache_dir / "records").iterdir())
    record.write_text(record.read_text()[:30])
    verified.index_path.unlink()
    assert SliceDataset([good_root], tmp_path / "cache").build_stats.built == 1


def test_processes_build_shares_and_wait_for_each_other(good_root, tmp_path):
    results = {}

    def build(rank):
        results[rank] = SliceDataset([good_root], tmp_path / "cache", rank=rank, world_size=2,
                                     build_delay_s=0.3 * (1 + rank))

    threads = [threading.Thread(target=build, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0].index == results[1].index and len(results[0]) == 3 * KEPT
    built = [results[r].build_stats.built for r in (0, 1)]
    assert sorted(built) == [1, 2] and [results[r].build_stats.awaited for r in (0, 1)] == built[::-1]


def test_build_workers_write_what_one_process_writes(good_root, tmp_path):
    one = SliceDataset([good_root], tmp_path / "one")
    two = SliceDataset([good_root], tmp_path / "two", workers=2)
    assert two.build_stats.workers == 2
    assert [(v["cache_size"], v["cache_checksum"], v["slices"]) for v in one.volumes] == \
        [(v["cache_size"], v["cache_checksum"], v["slices"]) for v in two.volumes]


def test_dicom_series_lists_are_kept(ct_sources, tmp_path, monkeypatch):
    series_lists = tmp_path / "lists"
    first = find_volumes(ct_sources["dicom"], series_lists)
    assert len(list(series_lists.iterdir())) == 1

    def no_header_scan(*args):
        raise AssertionError("an unchanged folder is not scanned again")

    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesIDs", no_header_scan)
    assert find_volumes(ct_sources["dicom"], series_lists) == first

    # a changed folder is
    monkeypatch.undo()
    folder = ct_sources["dicom"] / "patient1"
    (folder / "notes.txt").write_text("not DICOM")
    try:
        assert find_volumes(ct_sources["dicom"], series_lists) == first
    finally:
        (folder / "notes.txt").unlink()
