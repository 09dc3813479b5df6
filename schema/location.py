"""Where a store lives: a local folder (the default) or an S3-compatible prefix, `s3://bucket/prefix`.

    stepx runs --store s3://lab-bucket/stepx      (or STEPX_STORE=s3://lab-bucket/stepx)

Credentials and the endpoint come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for MinIO, Ceph, R2 or a test server),
read in one place here for both engines that touch the bucket: pyarrow's S3 file system (run files) and
delta-rs (the index tables). An S3 store holds the same run files as a local one:

    <prefix>/runs/<run_id>/<table>.parquet      uploaded first, immutable, overwritten by a retried run
    <prefix>/index/<table>/                     Delta Lake tables (runs, tokens, word_step_stats)

A run is visible exactly when its index rows are committed, so readers never see half a run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

S3_RE = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[^\x00]*))?")


class StoreLocationError(ValueError):
    """A store URL that can't be used (an unknown scheme, a malformed bucket), with a one-line reason."""


@dataclass(frozen=True)
class S3Location:
    """A store on an S3-compatible object store: the bucket and the key prefix (no slashes at the ends)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        """`bucket/prefix/part/...`: a path for pyarrow's S3 file system."""
        return "/".join([self.bucket, *([self.prefix] if self.prefix else []), *parts])

    def table_uri(self, table: str) -> str:
        """The URI of one index table (a Delta table) for delta-rs."""
        return "s3://" + self.key("index", table)

    def run_key(self, run_id: str, file: str = "") -> str:
        """The key of a run's folder (or one of its files); the run id is checked by the caller (check_run_id)."""
        return self.key("runs", run_id, file) if file else self.key("runs", run_id)


def is_remote(store: str | Path | None) -> bool:
    """Whether a --store value (or $STEPX_STORE when None) names an object store rather than a folder."""
    value = os.environ.get("STEPX_STORE", "") if store is None else str(store)
    return "://" in value


def parse_location(store: str | Path | None) -> S3Location | None:
    """The S3 location a --store value names (None for a local folder); StoreLocationError for other URLs."""
    value = os.environ.get("STEPX_STORE", "") if store is None else str(store)
    if "://" not in value:
        return None
    m = S3_RE.fullmatch(value)
    if m is None:
        scheme = value.split("://", 1)[0]
        if scheme != "s3":
            raise StoreLocationError(f"--store {value}: only local folders and s3://bucket/prefix are stores")
        raise StoreLocationError(f"--store {value}: not an S3 URL (s3://bucket/prefix, bucket in lower case)")
    prefix = (m["prefix"] or "").strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise StoreLocationError(f"--store {value}: the prefix has an empty, '.' or '..' part")
    return S3Location(m["bucket"], prefix)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem() -> object:
    """pyarrow's S3 file system configured from the standard AWS environment (endpoint, region, keys)."""
    from pyarrow import fs

    kwargs: dict = {"region": _region()}
    endpoint = _endpoint()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") if host else scheme, scheme=scheme if host else "https")
        kwargs["force_virtual_addressing"] = False
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    return fs.S3FileSystem(**kwargs)


def delta_storage_options() -> dict[str, str]:
    """delta-rs storage options from the same environment; commits use S3 conditional writes (no lock table)."""
    opts = {"AWS_REGION": _region(), "conditional_put": "etag"}
    endpoint = _endpoint()
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(name):
            opts[name] = os.environ[name]
    return opts


def one_copy_per_run(parts: list[pa.Table]) -> pa.Table | None:
    """Rows of several files of one index table with each run's rows taken from one file only.

    A run's rows are committed together in one file; a run committed twice (a writer that died between
    two tables and was retried) has two files with the same rows, of which the first listed is kept.
    """
    kept, seen = [], set()
    for part in parts:
        ids = part.column("run_id")
        here = set(pc.unique(ids).to_pylist())
        fresh = here - seen
        if fresh:
            kept.append(part if fresh == here else part.filter(pc.is_in(ids, pa.array(sorted(fresh)))))
        seen |= here
    return pa.concat_tables(kept, promote_options="default") if kept else None


def read_delta(dt: object) -> pa.Table | None:
    """One version of an index table (a DeltaTable) with one copy of each run's rows."""
    fragments = sorted(dt.to_pyarrow_dataset().get_fragments(), key=lambda f: f.path)
    return one_copy_per_run([f.to_table() for f in fragments])


def read_index(loc: S3Location) -> tuple[dict[str, pa.Table | None], dict[str, int]]:
    """The committed index tables of an S3 store (one copy of each run, rows only of runs the runs table
    lists) and the Delta version of each table read; None for a table nothing was committed to."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    tables: dict[str, pa.Table | None] = {}
    versions: dict[str, int] = {}
    for name in ("runs", "tokens", "word_step_stats"):  # runs first: the others are read at a later version
        try:
            dt = DeltaTable(loc.table_uri(name), storage_options=delta_storage_options())
        except TableNotFoundError:
            tables[name], versions[name] = None, -1
            continue
        versions[name] = dt.version()
        tables[name] = read_delta(dt)
    runs = tables["runs"]
    listed = pa.array(sorted(set(runs.column("run_id").to_pylist()))) if runs is not None else pa.array([], pa.string())
    for name in ("tokens", "word_step_stats"):
        t = tables[name]
        if t is not None:
            tables[name] = t.filter(pc.is_in(t.column("run_id"), listed))
    return tables, versions
