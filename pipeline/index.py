"""The store's index: copies of the small tables (runs, tokens, word_step_stats) in a few Parquet
segments, listed by `index/manifest.json`. A run is visible to readers, in every view, exactly when
the manifest lists it.

Writers append one segment per table per batch of new runs and merge segments in tiers of 8, so a
store of 10,000 runs is still a handful of files. The manifest is replaced by an atomic rename, so
readers (any number of processes) never take a lock and never see half an update; writers serialise
on a file lock, and under it remove what dead writers left (unlisted segments, temporary files, run
folders in tmp/ whose writer no longer holds their lock). Everything here can be rebuilt from the run
folders alone (`stepx index rebuild`), without reading a damaged manifest. No torch import: the CLI's
read-only commands use it too.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cross_rows import UpgradeRefused, needs_upgrade, upgrade_run
from schema import INDEX_TABLES, RUN_FILES, SCHEMA_VERSION, check_version, file_metadata
from schema.layout import (
    MANIFEST,
    MANIFEST_FORMAT,
    ManifestError,
    check_run_id,
    index_dir,
    index_problem,
    parse_manifest,
    read_manifest_bytes,
    run_dir,
    runs_dir,
    tmp_dir,
    valid_run_id,
)
from schema.tables import conform

MERGE_FANOUT = 8  # segments of one tier merged together: O(log n) files for n batches
RETIRE_GRACE_S = 300  # replaced segments stay this long for readers holding an older manifest
LOCK_FILE = ".lock"

# Called with a step name between durable write operations (files synced, renames, the manifest); the
# kill-at-every-step test sets it to SIGKILL the writer there. None in normal use.
STEP_HOOK: Callable[[str], None] | None = None


def write_step(name: str) -> None:
    """Mark the point after one durable write operation (a test seam; a no-op unless STEP_HOOK is set)."""
    if STEP_HOOK is not None:
        STEP_HOOK(name)


@dataclass
class Manifest:
    """The index's table of contents."""

    generation: int = 0
    run_ids: list[str] = field(default_factory=list)
    segments: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in INDEX_TABLES})
    bad_runs: dict[str, str] = field(default_factory=dict)
    retired: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "schema_version": SCHEMA_VERSION,
                "generation": self.generation,
                "run_ids": self.run_ids,
                "segments": self.segments,
                "bad_runs": self.bad_runs,
                "retired": self.retired,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check a manifest (ManifestError when it is damaged)."""
        d = parse_manifest(text)
        return cls(d["generation"], d["run_ids"], d["segments"], d["bad_runs"], d["retired"])


def read_manifest(root: Path) -> Manifest:
    """The current manifest, or an empty one for a new store; ManifestError when it is damaged."""
    try:
        return Manifest.from_json(read_manifest_bytes(index_dir(root) / MANIFEST))
    except FileNotFoundError:
        return Manifest()
    except OSError as exc:
        raise ManifestError(f"manifest.json can't be read: {exc.strerror or exc}") from None


def manifest_problem(root: Path, m: Manifest) -> str | None:
    """Why a parsed manifest can't be used (a segment missing, truncated, foreign; runs disagreeing), or None."""
    return index_problem(index_dir(root), {"segments": m.segments, "run_ids": m.run_ids})


def is_indexed(root: Path, run_id: str) -> bool:
    """Whether the index lists this run and its folder is a real one in runs/ (not a symlink out of the store, which
    a writer adding a file beside the run would follow); InvalidRunId for a malformed id, ManifestError for a
    damaged index."""
    if check_run_id(run_id) not in read_manifest(root).run_ids:
        return False
    folder = run_dir(root, run_id)
    return folder.is_dir() and not folder.is_symlink()


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a temporary name, fsync them, then rename into place (readers never see half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    write_step(f"wrote {tmp.name}")
    os.replace(tmp, path)
    write_step(f"renamed {path.name}")


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs: object) -> None:
    """Write a Parquet file under a temporary name, fsync it, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    pq.write_table(table, tmp, compression="zstd", **kwargs)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    write_step(f"wrote {tmp.name}")
    os.replace(tmp, path)
    write_step(f"renamed {path.name}")


@contextmanager
def _flocked(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, mode)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Serialise index writers across processes (readers never take it; the kernel drops it on death)."""
    with _flocked(index_dir(root) / LOCK_FILE, fcntl.LOCK_EX):
        yield


@contextmanager
def work_folder(root: Path, run_id: str) -> Iterator[Path]:
    """A fresh folder under tmp/ to write a run in, locked by this process until the block ends.

    The lock (flock on the folder) is what marks a writer alive: the kernel releases it when the
    process dies, whatever its PID, so `clean_tmp` removes exactly the folders of dead writers. The
    folder is created under tmp/.lock (shared), which `clean_tmp` takes exclusively, so no cleaner
    sees a folder between its creation and its lock.
    """
    check_run_id(run_id)
    with _flocked(tmp_dir(root) / LOCK_FILE, fcntl.LOCK_SH):
        work = tmp_dir(root) / f"{run_id}.{os.getpid()}.{secrets.token_hex(3)}"
        work.mkdir()
        fd = os.open(work, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    write_step("created tmp folder")
    try:
        yield work
    finally:
        os.close(fd)  # releases the lock
        shutil.rmtree(work, ignore_errors=True)  # gone already when it was renamed into runs/


def clean_tmp(root: Path) -> int:
    """Remove run folders in tmp/ whose writer is gone (its lock released); returns how many."""
    d = tmp_dir(root)
    if not d.is_dir():
        return 0
    removed = 0
    with _flocked(d / LOCK_FILE, fcntl.LOCK_EX):
        for p in d.iterdir():
            if p.name == LOCK_FILE:
                continue
            if not p.is_dir() or p.is_symlink():
                p.unlink(missing_ok=True)
                removed += 1
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            finally:
                os.close(fd)
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


def read_run_table(root: Path, run_id: str, table: str) -> pa.Table:
    """One table of one run, version-checked and cast to this version's columns."""
    path = run_dir(root, run_id) / RUN_FILES[table]
    pf = pq.ParquetFile(path)
    check_version(pf.schema_arrow.metadata, where=f"run {run_id} ({path.name})")
    return conform(table, pf.read())


def _segment(root: Path, table: str, data: pa.Table, generation: int, tier: int) -> dict:
    name = f"{table}-{generation:06d}-{secrets.token_hex(3)}.parquet"
    write_parquet_atomic(data.replace_schema_metadata(file_metadata()), index_dir(root) / name, row_group_size=1 << 17)
    return {"file": name, "rows": data.num_rows, "tier": tier}


def _merge_tiers(root: Path, m: Manifest, table: str) -> None:
    """Merge MERGE_FANOUT segments of equal tier into one of the next tier, repeatedly."""
    while True:
        segs = m.segments[table]
        tiers: dict[int, list[dict]] = {}
        for s in segs:
            tiers.setdefault(s["tier"], []).append(s)
        full = [t for t, group in tiers.items() if len(group) >= MERGE_FANOUT]
        if not full:
            return
        tier = min(full)
        group = tiers[tier]
        data = pa.concat_tables([pq.read_table(index_dir(root) / s["file"]) for s in group])
        merged = _segment(root, table, data, m.generation, tier + 1)
        now = time.time()
        m.retired += [{"file": s["file"], "at": now} for s in group]
        m.segments[table] = [s for s in segs if s not in group] + [merged]


def _expire_retired(root: Path, m: Manifest) -> None:
    now = time.time()
    keep = []
    for r in m.retired:
        if now - r["at"] > RETIRE_GRACE_S:
            (index_dir(root) / r["file"]).unlink(missing_ok=True)
        else:
            keep.append(r)
    m.retired = keep


def _sweep_index(root: Path, m: Manifest) -> int:
    """Under the writer lock: remove every file in index/ the manifest neither lists nor keeps for readers.

    Those are segments and temporary files of writers that died before their manifest landed (no
    other writer can be mid-commit while we hold the lock).
    """
    keep = {MANIFEST, LOCK_FILE} | {s["file"] for segs in m.segments.values() for s in segs}
    keep |= {r["file"] for r in m.retired}
    removed = 0
    for p in index_dir(root).iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def _collect(root: Path, run_ids: list[str], m: Manifest) -> tuple[list[str], dict[str, list[pa.Table]]]:
    """Read the index tables of runs; unreadable runs go to m.bad_runs by name."""
    good: list[str] = []
    parts: dict[str, list[pa.Table]] = {t: [] for t in INDEX_TABLES}
    for run_id in run_ids:
        try:
            tables = {t: read_run_table(root, run_id, t) for t in INDEX_TABLES}
            if tables["runs"].num_rows != 1 or tables["runs"].column("run_id")[0].as_py() != run_id:
                raise ValueError("runs.parquet does not describe this run")
        except Exception as exc:  # noqa: BLE001 - any unreadable file marks the run bad, by name
            m.bad_runs[run_id] = f"{type(exc).__name__}: {exc}"
            continue
        good.append(run_id)
        for t, data in tables.items():
            parts[t].append(data)
    return good, parts


def _append(root: Path, m: Manifest, run_ids: list[str]) -> list[str]:
    good, parts = _collect(root, run_ids, m)
    if good:
        m.generation += 1
        for t in INDEX_TABLES:
            m.segments[t].append(_segment(root, t, pa.concat_tables(parts[t]), m.generation, 0))
            _merge_tiers(root, m, t)
        m.run_ids += good
    return good


def list_run_dirs(root: Path) -> list[str]:
    """Run ids with a folder under runs/ (complete by construction: folders appear by rename)."""
    d = runs_dir(root)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if valid_run_id(p.name) and p.is_dir() and not p.is_symlink())


def _commit(root: Path, m: Manifest) -> None:
    path = index_dir(root) / MANIFEST
    if path.is_dir() and not path.is_symlink():  # damage a rename can't replace
        shutil.rmtree(path)
    write_atomic(path, m.to_json().encode())


def update_index(root: Path) -> list[str]:
    """Add every run folder the index doesn't list yet and clean dead writers' leftovers; return the ids added.

    A damaged index (unreadable manifest, a missing or foreign segment) is rebuilt from the run folders.
    """
    with writer_lock(root):
        try:
            m = read_manifest(root)
            damaged = manifest_problem(root, m)
        except ManifestError as exc:
            damaged = str(exc)
        if damaged:
            rebuilt, _ = _rebuild_locked(root)
            clean_tmp(root)
            return list(rebuilt.run_ids)
        known = set(m.run_ids) | set(m.bad_runs)
        new = [r for r in list_run_dirs(root) if r not in known]
        added = _append(root, m, new) if new else []
        if new:
            _expire_retired(root, m)
            _commit(root, m)
        _sweep_index(root, m)
        clean_tmp(root)
        return added


@dataclass
class RebuildReport:
    """What `stepx index rebuild` found."""

    runs: int
    bad_runs: dict[str, str]
    removed_tmp: int
    removed_index_files: int
    seconds: float
    upgraded: list[str] = field(default_factory=list)  # runs rewritten so level 'all' is DAAM's formula
    not_upgraded: dict[str, str] = field(default_factory=dict)  # runs left before schema 1.2, with why


def _rebuild_locked(root: Path) -> tuple[Manifest, int]:
    """Recreate the index from the run folders (the writer lock held); returns it and the files swept."""
    try:  # only to keep the old segments a while for readers that hold the old manifest
        old = read_manifest(root)
    except ManifestError:
        old = Manifest()
    m = Manifest(generation=old.generation)
    now = time.time()
    m.retired = old.retired + [{"file": s["file"], "at": now} for segs in old.segments.values() for s in segs]
    m.retired = [r for r in m.retired if (index_dir(root) / r["file"]).is_file()]
    run_ids = list_run_dirs(root)
    chunk = 512
    for i in range(0, len(run_ids), chunk):
        _append(root, m, run_ids[i : i + chunk])
    _expire_retired(root, m)
    _commit(root, m)
    return m, _sweep_index(root, m)


def rebuild_index(root: Path) -> RebuildReport:
    """Recreate the index from the run folders alone (never needs the old manifest); clean leftovers."""
    t0 = time.perf_counter()
    for d in (index_dir(root), tmp_dir(root)):  # damage no lock file can live in: a file where a folder goes
        if (d.exists() or d.is_symlink()) and not d.is_dir():
            d.unlink()
    with writer_lock(root):
        upgraded, refused = upgrade_runs(root)
        m, swept = _rebuild_locked(root)
        removed = clean_tmp(root)
    return RebuildReport(len(m.run_ids), dict(m.bad_runs), removed, swept, time.perf_counter() - t0, upgraded, refused)


def upgrade_runs(root: Path) -> tuple[list[str], dict[str, str]]:
    """Rewrite runs written before schema 1.2 from their stored level maps so level 'all' is DAAM's formula.

    Returns the runs upgraded and, by id, those that can't be (they keep the old maps and statistics).
    Unreadable runs are left to the index, which reports them as bad runs.
    """
    upgraded, refused = [], {}
    for run_id in list_run_dirs(root):
        try:
            if not needs_upgrade(root, run_id):
                continue
            upgrade_run(root, run_id, write_parquet_atomic)
            upgraded.append(run_id)
        except UpgradeRefused as exc:
            refused[run_id] = f"not upgraded to DAAM word maps (written before trace schema 1.2): {exc}"
        except (OSError, ValueError, KeyError, pa.ArrowException):
            continue
    return upgraded, refused
