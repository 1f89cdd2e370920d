"""Files that are complete or absent: write a temporary file, fsync, rename, fsync the folder.

Temporary names carry the writer's host and process id, so that a later start can tell the
leftovers of a killed writer (a dead process on this host) from the file a live one is writing,
also when several processes (torchrun ranks, ``python -m pretrain cache`` beside a run) share
a folder.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

_TMP = re.compile(r"^(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# Another host's leftovers cannot be checked for liveness: only ones this old are removed.
FOREIGN_TEMP_AGE_S = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname())[:40] or "host"


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_folder(folder: Path) -> None:
    # the rename itself is durable only once the folder entry is on disk
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[IO[bytes]], Any], durable: bool = True) -> None:
    """(Re)write ``path`` with ``write(binary file)`` through a temporary file in the same folder,
    renamed into place: readers never see a half-written file, and the temporary name is this
    writer's own, so two writers of the same file cannot write into each other's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of writers that died (killed mid-write) under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, host, now = [], _host(), time.time()
    for path in folder.rglob("*.tmp") if recursive else folder.glob("*.tmp"):
        match = _TMP.match(path.name)
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
            removed.append(path)
    if removed:
        logger.warning("removed %d temporary file(s) of killed writes under %s", len(removed), folder)
    return removed
