"""Reading an S3 store: a local read replica in the store layout, kept in step with the bucket.

    Store(local_root("s3://lab/stepx"))      # what `stepx --store s3://...` and the dashboard do

`sync` reads the committed index (Delta tables, one table version each, runs first; see
pipeline.remote_index), downloads the files of runs it has not seen yet (immutable: each once), and writes
the replica's index segments and manifest the way a local store's index does, manifest last by rename.
The Store then reads the replica exactly like a local store, with the same sandbox: its DuckDB can reach
only the replica's runs/ and index/ folders, which hold nothing but this prefix's committed runs, with
external access off. Nothing is ever written to the bucket from here.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schema import INDEX_TABLES, SCHEMA_VERSION, TABLES, file_metadata
from schema.layout import MANIFEST, MANIFEST_FORMAT, index_dir, runs_dir, store_root, valid_run_id
from schema.location import S3Location, parse_location, read_index, s3_filesystem
from schema.tables import conform

SYNC_EVERY_S = 5.0  # a replica younger than this is used as is (the dashboard reruns its script often)
DOWNLOAD_THREADS = 8  # object stores serve many small GETs in parallel
STATE = "replica.json"  # what the replica was built from: the store URL and the Delta versions read


def cache_dir(loc: S3Location) -> Path:
    """Where the replica of an S3 store lives: $STEPX_CACHE (default ~/.cache/stepx) / s3 / bucket / prefix."""
    base = Path(os.environ.get("STEPX_CACHE") or Path.home() / ".cache" / "stepx")
    return base / "s3" / loc.bucket / (loc.prefix or "_")


def local_root(store: str | Path | None = None, max_age_s: float = SYNC_EVERY_S) -> Path:
    """The folder to read a store from: a local store's own folder, or an S3 store's replica, synced first."""
    loc = parse_location(store)
    if loc is None:
        return store_root(store)
    return sync(loc, max_age_s=max_age_s)


def _download(fs: object, loc: S3Location, run_id: str, runs: Path) -> None:
    from pyarrow import fs as pafs

    work = runs.parent / "tmp" / f"{run_id}.{os.getpid()}.{secrets.token_hex(3)}"
    work.mkdir(parents=True)
    try:
        for info in fs.get_file_info(pafs.FileSelector(loc.run_key(run_id))):
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as src:
                    (work / info.base_name).write_bytes(src.read())
        os.replace(work, runs / run_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _segment(index: Path, table: str, data: pa.Table | None, generation: int) -> dict:
    data = conform(table, data) if data is not None else TABLES[table].empty_table()
    name = f"{table}-{generation:06d}-{secrets.token_hex(3)}.parquet"
    tmp = index / f".{name}.tmp"
    pq.write_table(data.replace_schema_metadata(file_metadata()), tmp, compression="zstd")
    os.replace(tmp, index / name)
    return {"file": name, "rows": data.num_rows, "tier": 0}


def sync(loc: S3Location, max_age_s: float = 0.0) -> Path:
    """Bring the replica of `loc` up to the bucket's committed index and return its folder."""
    root = cache_dir(loc)
    index = index_dir(root)
    index.mkdir(parents=True, exist_ok=True)
    runs_dir(root).mkdir(parents=True, exist_ok=True)
    state_path = root / STATE
    with open(root / ".sync.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one syncer per replica; readers never take it
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state.get("url") == loc.url and time.time() - state.get("synced_at", 0) < max_age_s:
            return root
        tables, versions = read_index(loc)
        if state.get("url") == loc.url and state.get("versions") == versions and (index / MANIFEST).exists():
            state["synced_at"] = time.time()
        else:
            run_ids = tables["runs"].column("run_id").to_pylist() if tables["runs"] is not None else []
            run_ids = [r for r in run_ids if valid_run_id(r)]
            missing = [r for r in run_ids if not (runs_dir(root) / r).is_dir()]
            fs = s3_filesystem()
            with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
                list(pool.map(lambda r: _download(fs, loc, r, runs_dir(root)), missing))
            generation = int(state.get("generation", 0)) + 1
            segments = {t: [_segment(index, t, tables[t], generation)] for t in INDEX_TABLES}
            manifest = {
                "format": MANIFEST_FORMAT,
                "schema_version": SCHEMA_VERSION,
                "generation": generation,
                "run_ids": run_ids,
                "segments": segments,
                "bad_runs": {},
                "retired": [],
            }
            tmp = index / f".{MANIFEST}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, index / MANIFEST)
            keep = {s["file"] for segs in segments.values() for s in segs} | set(state.get("segments", []))
            for p in index.glob("*-*-*.parquet"):
                if p.name not in keep:  # two generations kept: a reader may still hold the previous manifest
                    p.unlink(missing_ok=True)
            state = {
                "url": loc.url,
                "versions": versions,
                "generation": generation,
                "synced_at": time.time(),
                "segments": sorted(s["file"] for segs in segments.values() for s in segs),
            }
        tmp = root / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_path)
    return root
