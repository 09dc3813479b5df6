"""The store's index: copies of the small tables (runs, tokens, word_step_stats) in a few Parquet
segments, listed by `index/manifest.json`.

Writers append one segment per table per batch of new runs and merge segments in tiers of 8, so a
store of 10,000 runs is still a handful of files. The manifest is replaced by an atomic rename, so
readers (any number of processes) never take a lock and never see half an update; writers serialise
on a file lock. Everything here can be rebuilt from the run folders alone (`stepx index rebuild`).
No torch import: the CLI's read-only commands use it too.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schema import (
    INDEX_TABLES,
    RUN_FILES,
    SCHEMA_VERSION,
    TABLES,
    check_version,
    file_metadata,
)
from schema.layout import MANIFEST, index_dir, pid_alive, run_dir, runs_dir, tmp_dir

MERGE_FANOUT = 8  # segments of one tier merged together: O(log n) files for n batches
RETIRE_GRACE_S = 300  # old segments stay this long for readers holding an older manifest
MANIFEST_FORMAT = 1


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
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        return cls(d["generation"], d["run_ids"], d["segments"], d.get("bad_runs", {}), d.get("retired", []))


def read_manifest(root: Path) -> Manifest:
    """The current manifest, or an empty one for a new store."""
    path = index_dir(root) / MANIFEST
    try:
        return Manifest.from_json(path.read_text())
    except FileNotFoundError:
        return Manifest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a temporary name, fsync them, then rename into place (readers never see half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs: object) -> None:
    """Write a Parquet file under a temporary name, fsync it, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}")
    pq.write_table(table, tmp, compression="zstd", **kwargs)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Serialise index writers across processes (readers never take it)."""
    idx = index_dir(root)
    idx.mkdir(parents=True, exist_ok=True)
    with open(idx / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_run_table(root: Path, run_id: str, table: str) -> pa.Table:
    """One table of one run, version-checked and cast to this version's columns."""
    path = run_dir(root, run_id) / RUN_FILES[table]
    pf = pq.ParquetFile(path)
    check_version(pf.schema_arrow.metadata, where=f"run {run_id} ({path.name})")
    t = pf.read()
    return t.select([f.name for f in TABLES[table]]).cast(TABLES[table])


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


def _cleanup(root: Path, m: Manifest) -> None:
    now = time.time()
    keep = []
    for r in m.retired:
        if now - r["at"] > RETIRE_GRACE_S:
            (index_dir(root) / r["file"]).unlink(missing_ok=True)
        else:
            keep.append(r)
    m.retired = keep


def _collect(root: Path, run_ids: list[str], m: Manifest) -> tuple[list[str], dict[str, list[pa.Table]]]:
    """Read the index tables of runs; unreadable runs go to m.bad_runs by name."""
    good: list[str] = []
    parts: dict[str, list[pa.Table]] = {t: [] for t in INDEX_TABLES}
    for run_id in run_ids:
        try:
            tables = {t: read_run_table(root, run_id, t) for t in INDEX_TABLES}
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
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def update_index(root: Path) -> list[str]:
    """Add every run folder the index doesn't list yet; return the ids added."""
    with writer_lock(root):
        m = read_manifest(root)
        known = set(m.run_ids) | set(m.bad_runs)
        new = [r for r in list_run_dirs(root) if r not in known]
        added = _append(root, m, new) if new else []
        if new:
            _cleanup(root, m)
            write_atomic(index_dir(root) / MANIFEST, m.to_json().encode())
        return added


@dataclass
class RebuildReport:
    """What `stepx index rebuild` found."""

    runs: int
    bad_runs: dict[str, str]
    removed_tmp: int
    seconds: float


def rebuild_index(root: Path) -> RebuildReport:
    """Recreate the index from the run folders alone; stale temporary runs are removed."""
    t0 = time.perf_counter()
    with writer_lock(root):
        old = read_manifest(root)
        m = Manifest(generation=old.generation)
        now = time.time()
        m.retired = old.retired + [{"file": s["file"], "at": now} for segs in old.segments.values() for s in segs]
        run_ids = list_run_dirs(root)
        chunk = 512
        for i in range(0, len(run_ids), chunk):
            _append(root, m, run_ids[i : i + chunk])
        removed = clean_tmp(root)
        _cleanup(root, m)
        write_atomic(index_dir(root) / MANIFEST, m.to_json().encode())
    return RebuildReport(len(m.run_ids), dict(m.bad_runs), removed, time.perf_counter() - t0)


def clean_tmp(root: Path, older_than_s: float = 3600) -> int:
    """Remove half-written runs left by crashed writers (invisible to readers anyway)."""
    d = tmp_dir(root)
    if not d.is_dir():
        return 0
    removed = 0
    for p in d.iterdir():
        pid = p.name.rsplit(".", 1)[-1]
        alive = pid.isdigit() and pid_alive(int(pid))
        if not alive or time.time() - p.stat().st_mtime > older_than_s:
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed
