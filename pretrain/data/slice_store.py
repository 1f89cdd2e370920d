"""One volume's kept slices in one file, each slice compressed on its own (blosc2, as nnU-Net).

Layout: the compressed slices back to back, then a table of (offset, length, crc32) per slice,
then a 32-byte trailer (magic, table offset, slice count, rows, columns, dtype). A reader reads
the trailer and table once per file and then exactly one slice's bytes per item, with kernel
read-ahead off (``POSIX_FADV_RANDOM``): a random read pulls that slice and no more.

Integrity: the index keeps each file's size and the crc32 of its table and trailer (the file's
``checksum``), checked at every start for little I/O; every slice read checks its own crc32, so a
damaged slice is an error naming the file, never silent garbage.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import blosc2
import numpy as np

from nnunet_meddinov3.durable_files import move_into_place, temporary_path

MAGIC = b"MDSLICE1"
_TRAILER = struct.Struct("<8sQIIII")  # magic, table offset, slices, rows, columns, dtype code
_TABLE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("crc32", "<u4")])
DTYPES = {1: np.dtype("<i2"), 2: np.dtype("<f4")}
_CODES = {v: k for k, v in DTYPES.items()}
SUFFIX = ".slices"


class CacheDamaged(OSError):
    """A cache file that is not what the index says: rebuilt by ``python -m pretrain cache``."""


def _compress(plane: np.ndarray) -> bytes:
    # zstd level 1 with byte shuffle: ~2.6x on noisy int16 CT at ~1 ms a 512 x 512 slice each way
    return blosc2.compress2(np.ascontiguousarray(plane).tobytes(), codec=blosc2.Codec.ZSTD, clevel=1,
                            typesize=plane.dtype.itemsize, filters=[blosc2.Filter.SHUFFLE], nthreads=1)


class SliceFileWriter:
    """Appends slices to a temporary file; :meth:`commit` writes the table and renames it into place."""

    def __init__(self, path: Path, dtype: str, rows: int, columns: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.rows, self.columns = rows, columns
        self.tmp = temporary_path(self.path)
        self.file = open(self.tmp, "xb")
        self.entries: list[tuple[int, int, int]] = []
        self.offset = 0

    def append(self, plane: np.ndarray) -> None:
        if plane.shape != (self.rows, self.columns):
            raise ValueError(f"slice of shape {plane.shape}, expected {(self.rows, self.columns)}")
        data = _compress(plane.astype(self.dtype, copy=False))
        self.file.write(data)
        self.entries.append((self.offset, len(data), zlib.crc32(data)))
        self.offset += len(data)

    def commit(self) -> dict[str, int]:
        """Finish the file; returns its ``cache_size`` and ``cache_checksum`` for the index."""
        table = np.array(self.entries, dtype=_TABLE).tobytes()
        trailer = _TRAILER.pack(MAGIC, self.offset, len(self.entries), self.rows, self.columns,
                                _CODES[self.dtype])
        self.file.write(table + trailer)
        self.file.close()
        move_into_place(self.tmp, self.path)
        return {"cache_size": self.offset + len(table) + len(trailer), "cache_checksum": zlib.crc32(table + trailer)}

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> SliceFileWriter:
        return self

    def __exit__(self, kind, *rest) -> None:
        if kind is not None or not self.file.closed:
            self.discard()


class SliceFile:
    """Reads single slices of one cache file; raises :class:`CacheDamaged` on any mismatch."""

    def __init__(self, path: str, size: int, checksum: int):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            actual = os.fstat(self.fd).st_size
            if actual != size:
                raise CacheDamaged(f"cache file '{path}' has {actual} bytes, the index says {size}")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            footer = self._footer(size)
            if zlib.crc32(footer) != checksum:
                raise CacheDamaged(f"cache file '{path}' fails its checksum (table and trailer)")
            magic, table_offset, n, rows, columns, code = _TRAILER.unpack(footer[-_TRAILER.size:])
            self.table = np.frombuffer(footer[: n * _TABLE.itemsize], dtype=_TABLE)
            self.shape, self.dtype = (rows, columns), DTYPES[code]
        except BaseException:
            self.close()
            raise

    def _footer(self, size: int) -> bytes:
        if size < _TRAILER.size:
            raise CacheDamaged(f"cache file '{self.path}' is too short ({size} bytes)")
        trailer = os.pread(self.fd, _TRAILER.size, size - _TRAILER.size)
        magic, table_offset, n, *_ = _TRAILER.unpack(trailer)
        if magic != MAGIC or table_offset + n * _TABLE.itemsize + _TRAILER.size != size:
            raise CacheDamaged(f"cache file '{self.path}' is not a slice file of this version")
        return os.pread(self.fd, size - table_offset, table_offset)

    def __len__(self) -> int:
        return len(self.table)

    def read(self, i: int) -> np.ndarray:
        offset, length, crc = (int(v) for v in self.table[i])
        data = os.pread(self.fd, length, offset)
        if len(data) != length or zlib.crc32(data) != crc:
            raise CacheDamaged(f"slice {i} of cache file '{self.path}' is damaged (crc32 mismatch); "
                               "`python -m pretrain cache --verify` rebuilds damaged volumes")
        return np.frombuffer(blosc2.decompress2(data), dtype=self.dtype).reshape(self.shape)

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


_OPEN: OrderedDict[tuple[str, int, int], SliceFile] = OrderedDict()
MAX_OPEN = 64  # every open file holds a descriptor


def open_slice_file(path: str, size: int, checksum: int) -> SliceFile:
    """The open file of an index entry, from a small LRU; (size, checksum) keys out rebuilt files."""
    key = (path, size, checksum)
    store = _OPEN.pop(key, None) or SliceFile(path, size, checksum)
    _OPEN[key] = store
    while len(_OPEN) > MAX_OPEN:
        _OPEN.popitem(last=False)[1].close()
    return store


def read_slice(path: str, size: int, checksum: int, position: int) -> np.ndarray:
    """One slice; a file found damaged is opened again once, in case it was replaced since it was
    opened (a rebuild renames a new file into place, the open descriptor still reads the old one)."""
    try:
        return open_slice_file(path, size, checksum).read(position)
    except CacheDamaged:
        store = _OPEN.pop((path, size, checksum), None)
        if store is not None:
            store.close()
        return open_slice_file(path, size, checksum).read(position)


def check_slice_file(path: Path, size: int, checksum: int, every_slice: bool = False) -> str | None:
    """None when the file matches its index entry, else what is wrong. ``every_slice`` also
    checks each slice's crc32 (reads the whole file)."""
    try:
        store = SliceFile(str(path), size, checksum)
    except FileNotFoundError:
        return f"cache file '{path}' is missing"
    except CacheDamaged as e:
        return str(e)
    try:
        if every_slice:
            for offset, length, crc in store.table:
                data = os.pread(store.fd, int(length), int(offset))
                if zlib.crc32(data) != int(crc):
                    return f"a slice of cache file '{path}' is damaged (crc32 mismatch)"
        return None
    finally:
        store.close()


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (for cold-read measurements)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
