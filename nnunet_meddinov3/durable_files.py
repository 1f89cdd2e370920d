"""Files that are complete or absent, and finding the ones that are: the one place for crash-safe writing.

- :func:`write_atomically` writes a temporary file in the target's folder, fsyncs it, renames it onto the
  target (atomic within a file system) and fsyncs the folder (the rename survives a power loss): a kill at
  any moment leaves the previous file or the new one, never a truncated one.
- Temporary names carry the writer's host and process id (:func:`temporary_path`), so two writers of one
  file never write into each other's file, and :func:`remove_stale_temporaries` can tell the leftovers of
  a killed writer (a dead process on this host) from the file a live one is writing, also when several
  processes (torchrun ranks, ``python -m pretrain cache`` beside a run) share a folder.
- :func:`file_kind` says what a weights file is by its first bytes, whatever its name.
- :func:`first_readable` finds the newest file of a run that can still be read.

Standard library only: fine-tuning, inference, benchmarks and pretraining all build on it.
"""
from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, TypeVar

TEMP_SUFFIX = ".tmp"
# Another host's leftovers cannot be checked for liveness: only ones this old are removed.
FOREIGN_TEMP_AGE_S = 24 * 3600
# [.]NAME.HOST.PID.RANDOM.tmp; the leading dot hides the temporaries of files in folders users browse
_TEMPORARY = re.compile(r"^\.?(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_MAGIC = b"\x80"  # a pickle's PROTO opcode: torch.save's legacy format, or a raw pickle

Candidate = TypeVar("Candidate")
Contents = TypeVar("Contents")


# --- writing ------------------------------------------------------------------------------------------

def host_tag() -> str:
    """This host's name as temporary file names carry it."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname())[:40] or "host"


def temporary_path(target: str | os.PathLike, hidden: bool = False) -> Path:
    """A temporary file name next to ``target`` that is this writer's own (host, process id, random)."""
    target = Path(target)
    dot = "." if hidden else ""
    return target.with_name(f"{dot}{target.name}.{host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def fsync_folder(folder: str | os.PathLike) -> None:
    # a rename is durable only once the folder entry is on disk
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some (network) file systems cannot fsync a folder; the rename itself has happened
    finally:
        os.close(fd)


def move_into_place(temporary: str | os.PathLike, target: str | os.PathLike, *, durable: bool = True,
                    delay_s: float = 0.0) -> None:
    """Make the finished, closed file ``temporary`` the file ``target`` in one step: fsync it (``durable``),
    rename it onto ``target``, fsync the folder (``durable``). ``delay_s`` (tests of kills mid-write) waits
    before the rename. On failure ``temporary`` is removed and ``target`` is as it was."""
    try:
        if durable:
            with open(temporary, "rb") as f:  # fsync flushes the file's data whichever descriptor asks
                os.fsync(f.fileno())
        if delay_s:
            time.sleep(delay_s)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(Path(target).parent)


def write_atomically(target: str | os.PathLike, write: Callable[[Any], Any], *, write_to: str = "file",
                     durable: bool = True, hidden: bool = False, delay_s: float = 0.0) -> None:
    """(Re)write ``target`` through a temporary file in its folder, renamed into place
    (:func:`move_into_place`): readers never see a half-written file.

    ``write_to="file"``: ``write(f)`` gets the temporary file open for binary writing; ``write_to="path"``:
    ``write(path)`` gets its name, for writers that open the file themselves (``torch.save`` of nnU-Net's
    trainer, ``safetensors.torch.save_file``). ``durable=False`` skips the fsyncs (a report that can be
    made again); ``hidden`` starts the temporary name with a dot; ``delay_s`` see :func:`move_into_place`."""
    if write_to not in ("file", "path"):
        raise ValueError(f"write_to must be 'file' or 'path', not {write_to!r}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target, hidden)
    try:
        if write_to == "path":
            write(str(temporary))
        else:
            with open(temporary, "xb") as f:
                write(f)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    move_into_place(temporary, target, durable=durable, delay_s=delay_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Delete the temporary files of writers that died mid-write in ``folder`` (and below it, ``recursive``):
    those of a dead process on this host, and another host's ones older than ``FOREIGN_TEMP_AGE_S``.
    Returns the paths removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, host, now = [], host_tag(), time.time()
    for path in sorted(folder.rglob(f"*{TEMP_SUFFIX}") if recursive else folder.glob(f"*{TEMP_SUFFIX}")):
        match = _TEMPORARY.match(path.name)
        if match is None:
            continue
        if match["host"] == host:
            stale = not _alive(int(match["pid"]))
        else:
            try:
                stale = now - path.stat().st_mtime > FOREIGN_TEMP_AGE_S
            except FileNotFoundError:
                continue
        if stale:
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


# --- reading ------------------------------------------------------------------------------------------

def file_kind(path: str | os.PathLike) -> str | None:
    """What the file's first bytes say it is, whatever its name: ``"safetensors"`` (an 8-byte little-endian
    header length that fits the file, then the JSON header), ``"zip"`` (``torch.save``'s format),
    ``"pickle"`` (``torch.save``'s legacy format, or a raw pickle), or None (something else, or empty).
    OSError if it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(PICKLE_MAGIC):
        return "pickle"
    return None


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether the file's bytes are safetensors, whatever its name (see :func:`file_kind`)."""
    return file_kind(path) == "safetensors"


def first_readable(candidates: Iterable[Candidate], read: Callable[[Candidate], Contents],
                   errors: type[BaseException] | tuple[type[BaseException], ...] = Exception,
                   ) -> tuple[Candidate | None, Contents | None, list[tuple[Candidate, BaseException]]]:
    """``(candidate, read(candidate), passed_over)`` for the first of ``candidates`` (in order of preference,
    newest first) that ``read`` reads without raising one of ``errors``; ``passed_over`` holds each one
    before it with the error it raised. ``(None, None, passed_over)`` when none can be read. What to say
    about the files passed over, and whether to move them aside, is the caller's."""
    passed_over: list[tuple[Candidate, BaseException]] = []
    for candidate in candidates:
        try:
            contents = read(candidate)
        except errors as error:
            passed_over.append((candidate, error))
            continue
        return candidate, contents, passed_over
    return None, None, passed_over
