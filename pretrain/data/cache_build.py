"""Build, complete and check the slice cache: in parallel, resumable per volume, shared by ranks.

Layout under the cache folder (one folder may serve several configs)::

    CACHE/<kind>-<settings hash>/settings.json       the settings that change the cached content
                                 volumes/*.slices      one file per volume (slice_store.py)
                                 records/*.json        one record per volume, written as it finishes
                                 index-<selection>.json        the records of one (roots, exclusion)
                                 index-<selection>.skipped.json  the unusable volumes and why
    CACHE/dicom_series/*.json                           DICOM series lists (sources.py)

A volume counts as cached when its record matches its source files (paths, size, mtime) and its
slice file matches the record (size and checksum; every slice's crc32 with ``verify``), so a kill
loses only the volumes being built, and a damaged or half-written file is built again. With
several processes (torchrun), each builds a share (largest volumes spread first) and then waits,
polling the records, without a timeout, for the others' shares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_meddinov3.durable_files import remove_stale_temporaries, write_atomically

from .slice_store import check_slice_file
from .sources import DataError, Exclusion, VolumeSource, find_volumes
from .volume_reader import (
    RECORDS,
    VOLUMES,
    cache_volume,
    cache_volume_task,
    init_build_worker,
    record_path,
)

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
SERIES_LISTS = "dicom_series"


def settings_folder(cache_dir: Path, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{settings['preset']['kind']}-{digest}"


def index_path(folder: Path, roots: Sequence[str], exclusion: Exclusion) -> Path:
    selection = json.dumps({"roots": list(roots), "excluded": sorted(exclusion.case_ids)})
    return folder / f"index-{hashlib.sha256(selection.encode()).hexdigest()[:12]}.json"


def report_path(index: Path) -> Path:
    return index.with_suffix(".skipped.json")


def manifest_sha256(volumes: Sequence[dict[str, Any]], exclusion: Exclusion) -> str:
    """sha256 over the sorted (key, file size, shape, spacing, slice count) of the indexed volumes
    and the sorted excluded case ids."""
    rows = sorted(
        [v["key"], v["file_size"], v["original_shape"], [round(s, 6) for s in v["original_spacing"]], len(v["slices"])]
        for v in volumes
    )
    payload = json.dumps({"volumes": rows, "excluded_case_ids": sorted(exclusion.case_ids)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class BuildStats:
    """What one :func:`build_cache` call did on this process."""

    built: int = 0  # volumes this process wrote (usable or not)
    built_slices: int = 0  # slices read from those volumes
    kept_slices: int = 0  # of which stored
    seconds: float = 0.0
    workers: int = 1
    awaited: int = 0  # volumes other ranks built
    damaged: list[str] = field(default_factory=list)  # cache files found damaged and rebuilt


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s (%s); what it held is rebuilt", path, e)
        return None


def _matches_source(record: dict | None, source: VolumeSource, fingerprint: dict[str, int]) -> bool:
    return (record is not None and record.get("key") == source.key and record.get("files") == list(source.files)
            and all(record.get(k) == v for k, v in fingerprint.items()))


class _Checker:
    """Whether a record is current: it matches its source and (for a usable volume) its slice file."""

    def __init__(self, folder: Path, verify: bool, stats: BuildStats):
        self.folder, self.verify, self.stats = folder, verify, stats

    def __call__(self, record: dict | None, source: VolumeSource, fingerprint: dict[str, int]) -> bool:
        if not _matches_source(record, source, fingerprint):
            return False
        if "error" in record:
            return True
        problem = check_slice_file(self.folder / record["cache_file"], record["cache_size"],
                                   record["cache_checksum"], every_slice=self.verify)
        if problem is not None:
            logger.warning("%s: rebuilding it", problem)
            self.stats.damaged.append(record["cache_file"])
        return problem is None


def _shares(sources: list[VolumeSource], fingerprints: dict[str, dict], world_size: int) -> list[list[VolumeSource]]:
    """Largest volumes first, each to the least loaded rank: about equal bytes per rank."""
    shares: list[list[VolumeSource]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for source in sorted(sources, key=lambda s: (-fingerprints[s.key]["file_size"], s.key)):
        rank = loads.index(min(loads))
        shares[rank].append(source)
        loads[rank] += fingerprints[source.key]["file_size"] + 1
    return shares


def _log_skipped(record: dict) -> None:
    logger.warning("skipping volume %s (%s): %s", record["key"], ", ".join(record["files"][:2]) +
                   (", ..." if len(record["files"]) > 2 else ""), record["error"])


def _build_share(share: list[VolumeSource], folder: Path, settings: dict, needs_stats: bool, workers: int,
                 delay_s: float, stats: BuildStats, tag: str) -> dict[str, dict]:
    built: dict[str, dict] = {}
    if not share:
        return built
    tasks = [(source, folder, settings, needs_stats, delay_s) for source in share]
    start = last_log = time.monotonic()
    stats.workers = workers = max(1, min(workers, len(share)))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_build_worker)
        results = pool.imap_unordered(cache_volume_task, tasks)
    else:
        results = (cache_volume(*task) for task in tasks)
    try:
        for record in results:
            built[record["key"]] = record
            stats.built += 1
            if "error" in record:
                _log_skipped(record)
            else:
                stats.built_slices += record["shape"][0]
                stats.kept_slices += len(record["slices"])
            now = time.monotonic()
            if now - last_log > 10 or stats.built == len(share):
                rate = stats.built_slices / max(now - start, 1e-9)
                logger.info("%scached %d/%d volumes (%d slices, %.1f slices/s with %d worker(s))", tag, stats.built,
                            len(share), stats.built_slices, rate, workers)
                last_log = now
    finally:
        if pool is not None:
            pool.terminate()  # after a normal end there is nothing left; after Ctrl-C, stop the workers
            pool.join()
    stats.seconds = time.monotonic() - start
    return built


def _await_others(pending: dict[str, VolumeSource], fingerprints: dict, folder: Path, poll_s: float,
                  tag: str) -> dict[str, dict]:
    """The records of volumes other ranks build, once they are there: no timeout, progress logged."""
    done: dict[str, dict] = {}
    last_log = time.monotonic()
    total = len(pending)
    while pending:
        for key, source in list(pending.items()):
            record = _read_json(record_path(folder, key))
            if _matches_source(record, source, fingerprints[key]):
                done[key] = record
                del pending[key]
        if pending:
            if time.monotonic() - last_log > 60:
                logger.info("%swaiting for other ranks' volumes: %d/%d done, e.g. %s", tag, total - len(pending),
                            total, next(iter(pending)))
                last_log = time.monotonic()
            time.sleep(poll_s)
    return done


def build_cache(roots: Sequence[str | os.PathLike], cache_dir: str | os.PathLike, settings: dict[str, Any],
                exclusion: Exclusion, needs_stats: bool, workers: int = 1, rank: int = 0, world_size: int = 1,
                verify: bool = False, delay_s: float = 0.0, poll_s: float = 0.5) -> tuple[dict, Path, BuildStats]:
    """Complete the cache for ``roots`` and return (index, index path, this process's stats).

    Every process of a torchrun job calls this with its ``rank``: each builds its share, waits for
    the others', and all return the same index; rank 0 writes it and the report of skipped volumes.
    """
    roots = [str(Path(r).resolve()) for r in roots]
    folder = settings_folder(Path(cache_dir), settings)
    tag = f"[rank {rank}] " if world_size > 1 else ""
    sources = [v for root in roots for v in find_volumes(root, Path(cache_dir) / SERIES_LISTS)]
    where = ", ".join(f"'{r}'" for r in roots)
    if not sources:
        raise DataError(f"no volumes found under {where}: expected .nii/.nii.gz files, DICOM series or an nnU-Net "
                        f"raw dataset folder (imagesTr/, imagesTs/)")
    keys = [v.key for v in sources]
    if len(set(keys)) != len(keys):
        raise DataError(f"duplicate volume keys: {sorted({k for k in keys if keys.count(k) > 1})}")
    excluded = [{"key": s.key, "case_id": s.case_id} for s in sources if exclusion.matches(s)]
    selected = [s for s in sources if not exclusion.matches(s)]

    for stale_in in (folder / VOLUMES, folder / RECORDS, folder):
        if removed := remove_stale_temporaries(stale_in):
            logger.warning("removed %d temporary file(s) of killed writes under %s", len(removed), stale_in)
    if rank == 0 and not (folder / "settings.json").is_file():
        write_atomically(folder / "settings.json", lambda f: f.write(json.dumps(settings, indent=1).encode()))
    path = index_path(folder, roots, exclusion)
    previous = _read_json(path) or {}
    known = {v["key"]: v for v in previous.get("volumes", []) + previous.get("skipped", [])} \
        if previous.get("version") == INDEX_VERSION and previous.get("config") == settings else {}

    stats = BuildStats()
    check = _Checker(folder, verify, stats)
    fingerprints = {s.key: s.fingerprint() for s in selected}
    records: dict[str, dict] = {}
    missing = []
    for source in selected:
        record = known.get(source.key)
        if not _matches_source(record, source, fingerprints[source.key]):
            record = _read_json(record_path(folder, source.key))  # built after the index was written
        if check(record, source, fingerprints[source.key]):
            records[source.key] = record
        else:
            missing.append(source)

    if missing:
        shares = _shares(missing, fingerprints, world_size)
        logger.info("%sslice cache %s: %d of %d volumes to build, %d by this process", tag, folder, len(missing),
                    len(selected), len(shares[rank]))
        records.update(_build_share(shares[rank], folder, settings, needs_stats, workers, delay_s, stats, tag))
        others = {s.key: s for r, share in enumerate(shares) if r != rank for s in share}
        stats.awaited = len(others)
        records.update(_await_others(others, fingerprints, folder, poll_s, tag))

    volumes = [records[s.key] for s in selected if "error" not in records[s.key]]
    skipped = [records[s.key] for s in selected if "error" in records[s.key]]
    if selected and not volumes:
        _write_report(path, skipped, rank)
        reasons = "; ".join(f"{r['key']}: {r['error']}" for r in skipped[:3])
        raise DataError(f"none of the {len(selected)} volume(s) under {where} can be used ({reasons}"
                        f"{'; ...' if len(skipped) > 3 else ''}); the full list is in {report_path(path)}")
    index = {
        "version": INDEX_VERSION,
        "config": settings,
        "roots": roots,
        "exclusion": exclusion.to_dict(),
        "excluded": excluded,
        "skipped": skipped,
        "n_volumes": len(volumes),
        "n_slices": sum(len(v["slices"]) for v in volumes),
        "manifest_sha256": manifest_sha256(volumes, exclusion),
        "volumes": volumes,
    }
    if rank == 0:
        if index != previous:
            write_atomically(path, lambda f: f.write(json.dumps(index).encode()))
        _write_report(path, skipped, rank)
    return index, path, stats


def _write_report(index: Path, skipped: list[dict], rank: int) -> None:
    report = report_path(index)
    if rank != 0:
        return
    if skipped:
        rows = [{"key": r["key"], "files": r["files"], "reason": r["error"]} for r in skipped]
        write_atomically(report, lambda f: f.write(json.dumps(rows, indent=1).encode()), durable=False)
    else:
        report.unlink(missing_ok=True)
