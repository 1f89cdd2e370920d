"""Read one volume, reject what cannot be trusted, and write its kept slices to the cache.

A volume is read once in its own pixel type; resampling, the body test, rounding and compression
go one slice at a time, so the build holds the volume plus a few slices (MR also the resampled
volume as float32, whose percentiles the intensity preset needs), not several float32 copies.

Rejected, with the reason, rather than cached as zeros or NaN: files SimpleITK cannot read
(empty, garbage), truncated NIfTI (SimpleITK fills the missing part with zeros without a word),
NaN/Inf voxels (in NIfTI, where ITK reads them as zeros, found in the file itself), more than three dimensions, several components per pixel (RGB, vectors).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nnunet_meddinov3.durable_files import write_atomically

from .intensity import preset_from_dict
from .slice_store import SUFFIX, SliceFileWriter
from .sources import VolumeSource

RECORDS, VOLUMES = "records", "volumes"


class BadVolume(ValueError):
    """A volume that cannot be used; the message is the reason given in the log and the report."""


# --- NIfTI completeness -------------------------------------------------------------------------------


def _gzip_length(path: str) -> int:
    """Bytes of the whole (possibly multi-member) gzip stream; raises BadVolume when it ends early."""
    total, decompressor, in_member = 0, zlib.decompressobj(wbits=31), False
    with open(path, "rb") as f:
        data = b""
        while True:
            if not data:
                data = f.read(1 << 22)
                if not data:
                    break
            in_member = True
            total += len(decompressor.decompress(data, 1 << 24))
            if decompressor.eof:  # this member is complete; what follows is the next one, if any
                data, decompressor, in_member = decompressor.unused_data, zlib.decompressobj(wbits=31), False
            else:
                data = decompressor.unconsumed_tail
    if in_member:
        raise BadVolume(f"truncated gzip stream (ends after {total} bytes of image data)")
    return total


_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float voxels


def _nifti_header(header: bytes) -> tuple[str, int, int, int] | None:
    """(byte order, datatype, vox_offset, data bytes) of a NIfTI-1/2 header, or None when it is not one."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    return order, datatype, offset, int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8


def _count_nonfinite(f, order: str, kind: str, offset: int, nbytes: int) -> tuple[int, int]:
    """(bytes of voxel data read, non-finite voxels among them), a few MB at a time."""
    dtype = np.dtype(order + kind)
    f.seek(offset)
    done = bad = 0
    while done < nbytes:
        chunk = f.read(min(1 << 24, nbytes - done))
        if not chunk:
            break
        usable = len(chunk) - len(chunk) % dtype.itemsize
        bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype))))
        done += len(chunk)
    return done, bad


def check_nifti(path: str) -> None:
    """Raise BadVolume when a NIfTI file holds fewer bytes than its header announces, or float
    voxels that are NaN or infinite (ITK's reader turns those into zeros without a word)."""
    compressed = path.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            header = f.read(540)
    except (OSError, EOFError) as e:
        raise BadVolume(f"unreadable file ({e})") from None
    parsed = _nifti_header(header)
    if parsed is None:
        return  # not a NIfTI header: SimpleITK's reader decides
    order, datatype, offset, nbytes = parsed
    end = offset + nbytes
    if datatype in _FLOATS:  # read it all anyway: the length comes with it
        try:
            with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
                length, bad = _count_nonfinite(f, order, _FLOATS[datatype], offset, nbytes)
        except EOFError:
            raise BadVolume("truncated gzip stream") from None
        if length < nbytes:
            raise BadVolume(f"truncated NIfTI file: {offset + length} bytes where the header announces {end}")
        if bad:
            raise BadVolume(f"{bad} NaN or infinite voxel(s) of {nbytes // int(_FLOATS[datatype][1])}")
        return
    if compressed:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = struct.unpack("<I", f.read(4))[0]
        # gzip's trailer holds the data length modulo 2**32: a cut file ends inside the stream instead.
        # A mismatch may also be a multi-member file: only then decompress it all to be sure.
        length = end if isize == end % 2**32 else _gzip_length(path)
    else:
        length = Path(path).stat().st_size
    if length < end:
        raise BadVolume(f"truncated NIfTI file: {length} bytes where the header announces {end}")


# --- reading and checking -------------------------------------------------------------------------------


def read_volume(volume: VolumeSource) -> sitk.Image:
    """The volume as a 3D single-component image in its own pixel type (DICOM rescale applied,
    so CT is in HU); raises BadVolume saying why it cannot be used."""
    if not volume.dicom and volume.files[0].endswith((".nii", ".nii.gz")):
        check_nifti(volume.files[0])
    try:
        if volume.dicom:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(volume.files))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(volume.files[0])
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        reason = re.sub(r"^.*?sitk::ERROR: ", "", reason)
        raise BadVolume(f"unreadable ({reason[:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadVolume(f"{image.GetNumberOfComponentsPerPixel()} components per pixel (RGB or vector image); "
                        "expected a single-channel image")
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:  # a 3D image stored with a time axis of length 1
        image = image[:, :, :, 0]
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise BadVolume(f"{image.GetDimension()}D image of size {list(size)}; expected a 3D image")
    if min(image.GetSize()) == 0:
        raise BadVolume(f"empty image of size {list(image.GetSize())}")
    return image


def _check_finite(array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.integer):
        return
    bad = sum(int(np.count_nonzero(~np.isfinite(plane))) for plane in array)  # a slice at a time: no volume copy
    if bad:
        raise BadVolume(f"{bad} NaN or infinite voxel(s) of {array.size}")


class InPlaneResampler:
    """Linear resampling of single slices to (row, column) ``spacing`` mm, keeping the outer pixel
    edges (the field of view) in place; the same grid as resampling the volume's two in-plane
    axes at once."""

    def __init__(self, image: sitk.Image, spacing: tuple[float, float], air: float):
        self.old = np.array(image.GetSpacing()[:2])
        self.new = np.array([spacing[1], spacing[0]], dtype=float)
        self.size = [int(s) for s in np.maximum(1, np.round(np.array(image.GetSize()[:2]) * self.old / self.new))]
        # in index space, the first output pixel centre sits half a spacing change from the input's
        self.origin = ((self.new - self.old) / 2).tolist()
        self.air = air

    def __call__(self, plane: np.ndarray) -> np.ndarray:
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing(self.old.tolist())
        out = sitk.Resample(image, self.size, sitk.Transform(), sitk.sitkLinear, self.origin, self.new.tolist(),
                            (1.0, 0.0, 0.0, 1.0), self.air)
        return sitk.GetArrayFromImage(out)

    def spacing_zyx(self, z: float) -> list[float]:
        return [z, float(self.new[1]), float(self.new[0])]


# --- one volume into the cache ---------------------------------------------------------------------------


def cache_name(key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[-80:]
    return f"{readable}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def record_path(folder: Path, key: str) -> Path:
    return folder / RECORDS / f"{cache_name(key)}.json"


def _base_record(source: VolumeSource, fingerprint: dict[str, int]) -> dict[str, Any]:
    return {"key": source.key, "case_id": source.case_id, "files": list(source.files), **fingerprint}


def cache_volume(source: VolumeSource, folder: Path, settings: dict[str, Any], needs_stats: bool,
                 delay_s: float = 0.0) -> dict[str, Any]:
    """Write ``source``'s slice file and record under ``folder``; returns the record, which has an
    ``error`` instead of slices when the volume is unusable. ``delay_s`` (a debug setting) makes
    the build that much slower, for tests of what waits on it."""
    fingerprint = source.fingerprint()
    record = _base_record(source, fingerprint)
    try:
        record.update(_write_slices(source, folder, settings, needs_stats, delay_s))
    except BadVolume as e:
        record["error"] = str(e)
    write_atomically(record_path(folder, source.key), lambda f: f.write(json.dumps(record).encode()))
    return record


def _write_slices(source: VolumeSource, folder: Path, settings: dict[str, Any], needs_stats: bool,
                  delay_s: float) -> dict[str, Any]:
    image = read_volume(source)
    array = sitk.GetArrayViewFromImage(image)  # (slices, rows, columns), no copy
    _check_finite(array)
    depth = array.shape[0]
    spacing = list(image.GetSpacing())[::-1]
    resample = None
    if settings["target_spacing"] is not None:
        resample = InPlaneResampler(image, settings["target_spacing"], float(array.min()))
    rows, columns = (resample.size[1], resample.size[0]) if resample else array.shape[1:]
    int16 = settings["cache_dtype"] == "int16"
    threshold, fraction = settings["body_threshold"], settings["min_body_fraction"]
    stored_volume = np.empty((depth, rows, columns), np.float32) if needs_stats else None
    kept = []
    cache_file = f"{VOLUMES}/{cache_name(source.key)}{SUFFIX}"
    with SliceFileWriter(folder / cache_file, settings["cache_dtype"], rows, columns) as writer:
        for k in range(depth):
            plane = array[k].astype(np.float32)
            if resample is not None:
                plane = resample(plane)
            stored = np.clip(np.rint(plane), -32768, 32767).astype(np.int16) if int16 else plane
            if stored_volume is not None:
                stored_volume[k] = stored
            if threshold is None or (plane > threshold).mean() >= fraction:
                writer.append(stored)
                kept.append(k)
            if delay_s:
                time.sleep(delay_s / depth)
        stats = preset_from_dict(settings["preset"]).volume_stats(stored_volume) if needs_stats else {}
        written = writer.commit()
    return {
        "original_shape": [depth, *array.shape[1:]],
        "original_spacing": spacing,
        "shape": [depth, rows, columns],
        "spacing": resample.spacing_zyx(spacing[0]) if resample else spacing,
        "slices": kept,
        # statistics of the stored (rounded, resampled) volume, so they match what is read
        "stats": stats,
        "cache_file": cache_file,
        **written,
    }


def cache_volume_task(args: tuple) -> dict[str, Any]:
    """:func:`cache_volume` for a process pool."""
    return cache_volume(*args)


def init_build_worker() -> None:
    """A build worker: one thread (the pool gives the parallelism); Ctrl-C is the parent's to handle."""
    import signal

    import blosc2

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    blosc2.set_nthreads(1)

