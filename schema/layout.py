"""Where things live in a store folder; shared by the writer, the index and the readers.

<store>/runs/<run_id>/<table>.parquet   one immutable folder per complete run (visible once indexed)
<store>/tmp/<run_id>.<pid>.<hex>/        runs being written (never read; their writer holds a lock on them)
<store>/index/manifest.json              the index: segment files per table, run ids
<store>/index/<table>-<n>-<hex>.parquet  index segments (copies of the small tables)

A run id becomes part of a path only through `run_dir`, which refuses anything that is not a plain
run id (`valid_run_id`), so no id from a user, a URL or a damaged manifest can reach outside runs/.
The manifest is parsed and checked in one place, `parse_manifest`.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from schema.tables import INDEX_TABLES, VERSION_RE

DEFAULT_STORE = Path(__file__).resolve().parent.parent / "data" / "store"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

# Letters, digits, '-', '_' and '.', starting with a letter or digit, at most 128 characters: every id the
# writers make (`20260301-120000-a1b2c3`, `job-…`) fits, and no such name is '..', absolute, or holds '/'.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEGMENT_RE = re.compile(r"(?P<table>[a-z_]+)-\d{6,}-[0-9a-f]{6}\.parquet")


class InvalidRunId(ValueError):
    """A run id that is not a plain name (empty, a path, control characters, too long)."""


class ManifestError(ValueError):
    """The index manifest can't be read or breaks the format; `stepx index rebuild` recreates it."""


def valid_run_id(run_id: object) -> bool:
    """Whether `run_id` is a plain run id that can name a folder under runs/."""
    return isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) is not None


def check_run_id(run_id: object) -> str:
    """Return `run_id`, or raise InvalidRunId with a one-line reason."""
    if not valid_run_id(run_id):
        shown = repr(run_id) if len(repr(run_id)) <= 80 else repr(run_id)[:77] + "..."
        raise InvalidRunId(
            f"{shown} is not a run id (letters, digits, '.', '_' and '-', starting with a letter or digit)"
        )
    return run_id


def store_root(store: str | Path | None = None) -> Path:
    """The store folder: the argument, else $STEPX_STORE, else data/store in the checkout."""
    if store is not None:
        return Path(store)
    env = os.environ.get("STEPX_STORE")
    return Path(env) if env else DEFAULT_STORE


def runs_dir(root: Path) -> Path:
    return root / "runs"


def tmp_dir(root: Path) -> Path:
    return root / "tmp"


def index_dir(root: Path) -> Path:
    return root / "index"


def gallery_progress_path(root: Path) -> Path:
    """JSON progress of a gallery build (written by jobs.gallery, read by the dashboard's Gallery page)."""
    return Path(root) / "jobs" / "gallery-progress.json"


def run_dir(root: Path, run_id: str) -> Path:
    """The folder of one run; InvalidRunId for anything that is not a plain run id."""
    return root / "runs" / check_run_id(run_id)


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ManifestError(what)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MAX_MANIFEST_BYTES = 256 << 20  # ~8M run ids; a larger manifest.json is damage, not an index


def read_manifest_bytes(path: Path) -> bytes:
    """The manifest file's bytes; ManifestError unless it is a regular file of at most MAX_MANIFEST_BYTES.

    Opened without blocking and checked before reading, so a FIFO, a device (`/dev/zero`) or a huge file put
    where the manifest goes is damage with one line, never a hang or an out-of-memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except IsADirectoryError:
        raise ManifestError("manifest.json is a folder") from None
    try:
        st = os.fstat(fd)
        _expect(stat.S_ISREG(st.st_mode), "manifest.json is not a regular file")
        _expect(st.st_size <= MAX_MANIFEST_BYTES, f"manifest.json is {st.st_size:,} bytes, past any real index")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)


def parse_manifest(text: str | bytes) -> dict:
    """The manifest as a dict with every field checked; ManifestError names the first problem found."""
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"manifest.json is not JSON: {str(exc)[:80]}") from None
    _expect(isinstance(d, dict), "manifest.json is not a JSON object")
    for key in ("format", "schema_version", "generation", "run_ids", "segments"):
        _expect(key in d, f"manifest.json has no {key!r}")
    _expect(_is_int(d["format"]) and d["format"] <= MANIFEST_FORMAT, f"unknown manifest format {d['format']!r}")
    _expect(
        isinstance(d["schema_version"], str) and VERSION_RE.fullmatch(d["schema_version"]) is not None,
        "schema_version is not a version number",
    )
    _expect(_is_int(d["generation"]) and d["generation"] >= 0, "generation is not a whole number")
    run_ids = d["run_ids"]
    _expect(isinstance(run_ids, list) and all(valid_run_id(r) for r in run_ids), "run_ids holds a bad run id")
    _expect(len(set(run_ids)) == len(run_ids), "run_ids lists a run twice")
    segments = d["segments"]
    _expect(isinstance(segments, dict) and set(segments) == set(INDEX_TABLES), "segments is not one list per table")
    for table, segs in segments.items():
        _expect(isinstance(segs, list), f"segments of {table} is not a list")
        for s in segs:
            _expect(isinstance(s, dict), f"a segment of {table} is not an object")
            m = SEGMENT_RE.fullmatch(s.get("file")) if isinstance(s.get("file"), str) else None
            _expect(m is not None and m["table"] == table, f"bad segment file name {s.get('file')!r}")
            _expect(_is_int(s.get("rows")) and s["rows"] >= 0, f"segment {s['file']} has no row count")
            _expect(_is_int(s.get("tier")) and s["tier"] >= 0, f"segment {s['file']} has no tier")
    bad = d.get("bad_runs", {})
    _expect(isinstance(bad, dict) and all(isinstance(v, str) for v in bad.values()), "bad_runs is not a map")
    _expect(all(valid_run_id(r) for r in bad), "bad_runs holds a bad run id")
    retired = d.get("retired", [])
    _expect(isinstance(retired, list), "retired is not a list")
    for r in retired:
        ok = isinstance(r, dict) and isinstance(r.get("file"), str) and SEGMENT_RE.fullmatch(r["file"]) is not None
        _expect(ok and isinstance(r.get("at"), int | float), "a retired segment is malformed")
    return {**d, "bad_runs": bad, "retired": retired}


def index_problem(index: Path, manifest: dict) -> str | None:
    """Why a parsed manifest's index can't be used (a segment missing, truncated or foreign, or the runs
    segments listing other runs than run_ids, which the raw views read), or None."""
    import pyarrow.parquet as pq

    for table, segs in manifest["segments"].items():
        for s in segs:
            problem = segment_problem(index / s["file"], table, s["rows"])
            if problem:
                return problem
    listed: list[str] = []
    for s in manifest["segments"]["runs"]:
        # ParquetFile, not read_table: read_table loads pyarrow.dataset, which imports pandas (~1 s per command)
        listed += pq.ParquetFile(index / s["file"]).read(columns=["run_id"]).column("run_id").to_pylist()
    if not all(valid_run_id(r) for r in listed):
        return "a runs segment holds a missing or malformed run id"
    if sorted(listed) != sorted(manifest["run_ids"]):
        return "run_ids and the runs segments list different runs"
    return None


def segment_problem(path: Path, table: str, rows: int) -> str | None:
    """Why an index segment can't be used (missing, not Parquet, another table's, wrong length), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schema.tables import TABLES

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"segment {path.name} is missing"
    if not stat.S_ISREG(st.st_mode):
        return f"segment {path.name} is not a regular file"
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        return f"segment {path.name} is missing"
    except (OSError, pa.ArrowException) as exc:
        return f"segment {path.name} is unreadable: {str(exc)[:80]}"
    names = set(pf.schema_arrow.names)
    missing = [f.name for f in TABLES[table] if f.name not in names]
    if missing:
        return f"segment {path.name} is not a {table} segment (no {missing[0]} column)"
    found = pf.schema_arrow
    wrong = [f.name for f in TABLES[table] if found.field(f.name).type != f.type]
    if wrong:
        want = TABLES[table].field(wrong[0]).type
        return f"segment {path.name} holds column {wrong[0]} as {found.field(wrong[0]).type}, not {want}"
    if pf.metadata.num_rows != rows:
        return f"segment {path.name} has {pf.metadata.num_rows} rows, the manifest says {rows}"
    return None
