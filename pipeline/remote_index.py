"""Publishing runs to an S3 store: run files uploaded first, then index rows committed to Delta Lake tables.

Why Delta Lake (delta-rs): a local store's index serialises writers on a file lock and replaces its
manifest by rename; object storage has neither. A Delta table's log is a sequence of numbered JSON
commits written with S3 conditional writes (put-if-absent), so any number of writers on any number of
machines commit concurrently without a lock service: a loser of a race re-reads the log and retries,
and appends never conflict with appends. Readers read one table version, so they never see part of a
commit.

Visibility: a run's files go to `<prefix>/runs/<run_id>/` first; then its tokens and word_step_stats rows
are appended, and its runs row last. Readers take the runs table as the list of runs and read the other
tables' rows only for those ids (store.remote), so a run is visible exactly when its runs row is
committed. A run published twice (a retried batch task: the same id, see jobs.batch) overwrites the same
keys; its index rows are skipped when the runs row is already there, and rows left by a writer that died
between two tables are read once (readers keep one file's rows per run, `compact` keeps one copy).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schema import RUN_FILES
from schema.layout import check_run_id
from schema.location import S3Location, delta_storage_options, read_delta, s3_filesystem
from schema.tables import conform

COMMIT_ORDER = ("tokens", "word_step_stats", "runs")  # runs last: it is what makes a run visible
COMMIT_TRIES = 12  # concurrent commits that lost a race re-read the log and try again
VACUUM_RETENTION_H = 1  # compaction removes replaced files only after readers of older versions are done


def delta_table(loc: S3Location, table: str) -> object | None:
    """The Delta table of one index table, or None while nothing was committed to it."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(loc.table_uri(table), storage_options=delta_storage_options())
    except TableNotFoundError:
        return None


def upload_run(loc: S3Location, folder: Path, run_id: str) -> int:
    """Copy a finished run folder's files to `<prefix>/runs/<run_id>/` (same keys on a retry); returns bytes."""
    fs = s3_filesystem()
    check_run_id(run_id)
    total = 0
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            data = path.read_bytes()
            with fs.open_output_stream(loc.run_key(run_id, path.name)) as out:
                out.write(data)
            total += len(data)
    return total


def committed(loc: S3Location, run_ids: list[str]) -> set[str]:
    """Which of these run ids the runs table already lists."""
    dt = delta_table(loc, "runs")
    if dt is None or not run_ids:
        return set()
    ds = dt.to_pyarrow_dataset()
    found = ds.to_table(columns=["run_id"], filter=pc.field("run_id").isin(run_ids))
    return set(found.column("run_id").to_pylist())


def _append(loc: S3Location, table: str, data: pa.Table) -> None:
    from deltalake import write_deltalake
    from deltalake.exceptions import CommitFailedError, DeltaError

    for attempt in range(COMMIT_TRIES):
        try:
            write_deltalake(
                loc.table_uri(table), data, mode="append", schema_mode="merge", storage_options=delta_storage_options()
            )
            return
        except (CommitFailedError, DeltaError):
            if attempt == COMMIT_TRIES - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))


def index_rows(folder: Path, table: str) -> pa.Table:
    """One index table's rows of a run folder, in the schema's columns (no per-file metadata)."""
    return conform(table, pq.read_table(Path(folder) / RUN_FILES[table])).replace_schema_metadata(None)


def commit_runs(loc: S3Location, folders: dict[str, Path]) -> list[str]:
    """Commit the index rows of uploaded run folders (by run id); returns the ids newly made visible."""
    new = [r for r in folders if r not in committed(loc, list(folders))]
    if not new:
        return []
    for table in COMMIT_ORDER:
        _append(loc, table, pa.concat_tables([index_rows(folders[r], table) for r in new]))
    return new


def publish_run(loc: S3Location, folder: Path, run_id: str) -> bool:
    """Upload a run folder and commit it to the index; False when the run was already visible (a retry)."""
    upload_run(loc, folder, run_id)
    return bool(commit_runs(loc, {run_id: Path(folder)}))


def compact(loc: S3Location) -> dict[str, tuple[int, int]]:
    """Rewrite each index table as one file holding one copy of each run's rows; (files before, after) by table.

    Each rewrite is one overwrite commit based on the version it read: a writer appending meanwhile makes it
    fail and re-read (no row is dropped). Replaced files are vacuumed once older than VACUUM_RETENTION_H, so
    readers of older versions finish first.
    """
    from deltalake import write_deltalake
    from deltalake.exceptions import CommitFailedError

    report = {}
    for name in COMMIT_ORDER:
        for attempt in range(COMMIT_TRIES):
            dt = delta_table(loc, name)
            if dt is None:
                break
            before = len(dt.file_uris())
            data = read_delta(dt)
            try:
                write_deltalake(dt, data, mode="overwrite", schema_mode="merge")
            except CommitFailedError:
                if attempt == COMMIT_TRIES - 1:
                    raise
                time.sleep(0.1 * (1 + attempt))
                continue
            dt = delta_table(loc, name)
            dt.vacuum(retention_hours=VACUUM_RETENTION_H, enforce_retention_duration=False, dry_run=False)
            report[name] = (before, len(dt.file_uris()))
            break
    return report


COMPACT_AFTER = 32  # index files per table that trigger a compaction at the end of a batch


def maybe_compact(loc: S3Location) -> dict[str, tuple[int, int]] | None:
    """Compact when any index table has more than COMPACT_AFTER files (called after each batch); the report."""
    tables = [delta_table(loc, t) for t in COMMIT_ORDER]
    if any(dt is not None and len(dt.file_uris()) > COMPACT_AFTER for dt in tables):
        return compact(loc)
    return None
