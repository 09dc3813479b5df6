"""Scale-out benchmarks (issue 19): runs/minute serial vs Ray, 1,000 runs local vs an S3 endpoint, 100k projected.

    python -c "from bench.scale import scale_results; print(scale_results())"     (make bench runs it too)

The S3 endpoint is a moto server on 127.0.0.1 (no network latency: real object stores add ~10-50 ms a GET),
the Ray cluster a local one on the loopback with 2 model-holding actors on this machine's 2 cores.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TMP = HERE / "tmp"
SQL_AGGREGATE = "SELECT word, level, avg(mass) AS mass FROM word_step_stats GROUP BY ALL"


def _moto() -> tuple[object, dict]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.get_host_and_port()[1]}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
    }
    os.environ.update(env)
    return server, env


def throughput(model: str = "tiny-random", n: int = 8, steps: int = 10) -> dict:
    """Runs per minute: one process in a loop vs a local Ray cluster with 2 actors (model load included)."""
    from jobs.batch import BatchItem, run_local
    from jobs.ray_batch import connect, run_ray

    items = [BatchItem(p, s, steps) for p in ("a red circle", "a blue square") for s in range(n // 2)]
    out: dict = {"model": model, "runs": len(items), "steps": steps}
    root = Path(tempfile.mkdtemp(prefix="stepx-bench-"))
    try:
        t0 = time.perf_counter()
        run_local(items, root / "serial", model)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        connect(None)
        out["ray_init_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        run_ray(items, str(root / "ray"), model, workers=2)
        ray_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["serial_runs_per_min"] = round(60 * len(items) / serial, 1)
    out["ray_2_workers_runs_per_min"] = round(60 * len(items) / ray_s, 1)
    out["note"] = "wall time of the whole job, model loads included; ray.init excluded"
    return out


def _synth(n_runs: int) -> Path:
    from jobs.synth import synth_store

    store_dir = TMP / f"synth-{n_runs}"
    if not (store_dir / ".complete").exists():
        shutil.rmtree(store_dir, ignore_errors=True)
        synth_store(store_dir, n_runs, steps=20, seed=1)
        (store_dir / ".complete").touch()
    return store_dir


def _point_and_aggregate(read_map: object, sql: object, run_ids: list[str], reps: int = 30) -> dict:
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        read_map(run_ids[(i * 7919) % len(run_ids)])
        times.append((time.perf_counter() - t0) * 1000)
    agg = []
    for _ in range(3):
        t0 = time.perf_counter()
        sql()
        agg.append((time.perf_counter() - t0) * 1000)
    return {"point_read_p50_ms": round(statistics.median(times), 1), "aggregate_p50_ms": round(statistics.median(agg))}


def local_vs_s3(n_runs: int = 1000) -> dict:
    """Point read (one word map) and a SQL aggregate at n runs: a local store, the S3 store read directly
    (pyarrow S3 file system; Delta index as an Arrow dataset registered in DuckDB), and its local replica."""
    import boto3
    import duckdb
    import pyarrow.parquet as pq

    from pipeline.remote_index import commit_runs, upload_run
    from schema.location import parse_location, read_index, s3_filesystem
    from store import GLOBAL, Store
    from store.remote import sync

    local = _synth(n_runs)
    store = Store(local)
    run_ids = [r["run_id"] for r in store.runs()]
    out: dict = {"runs": n_runs}
    out["local"] = _point_and_aggregate(
        lambda r: store.word_map(r, GLOBAL, step=5), lambda: store.sql(SQL_AGGREGATE), run_ids
    )
    server, _ = _moto()
    cache = Path(tempfile.mkdtemp(prefix="stepx-cache-"))
    os.environ["STEPX_CACHE"] = str(cache)
    try:
        boto3.client("s3").create_bucket(Bucket="bench")
        loc = parse_location("s3://bench/stepx")
        t0 = time.perf_counter()
        folders = {r: local / "runs" / r for r in run_ids}
        for r, f in folders.items():
            upload_run(loc, f, r)
        upload = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = list(folders)
        for i in range(0, len(ids), 100):  # 10 writers' worth of commits of 100 runs
            commit_runs(loc, {r: folders[r] for r in ids[i : i + 100]})
        out["publish"] = {"upload_s": round(upload, 1), "commit_s": round(time.perf_counter() - t0, 1), "commits": 10}
        fs = s3_filesystem()

        def s3_point(r: str) -> None:
            pf = pq.ParquetFile(loc.run_key(r, "cross_attention.parquet"), filesystem=fs)
            pf.read_row_group(5)

        def s3_sql() -> None:
            tables, _ = read_index(loc)
            con = duckdb.connect()
            con.execute("SET enable_external_access = false")
            con.register("word_step_stats", tables["word_step_stats"])
            con.execute(SQL_AGGREGATE).fetchall()

        out["s3_direct"] = _point_and_aggregate(s3_point, s3_sql, run_ids, reps=15)
        t0 = time.perf_counter()
        replica = Store(sync(loc))
        out["replica_cold_sync_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        sync(loc)
        out["replica_warm_sync_ms"] = round((time.perf_counter() - t0) * 1000)
        out["s3_replica"] = _point_and_aggregate(
            lambda r: replica.word_map(r, GLOBAL, step=5), lambda: replica.sql(SQL_AGGREGATE), run_ids
        )
        out["sizes"] = _sizes(local, loc, n_runs)
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
    return out


def _sizes(local: Path, loc: object, n_runs: int) -> dict:
    from pyarrow import fs as pafs

    from schema.location import s3_filesystem

    fs = s3_filesystem()
    infos = [i for i in fs.get_file_info(pafs.FileSelector(loc.key(), recursive=True)) if i.type == pafs.FileType.File]
    runs = [i for i in infos if "/runs/" in i.path]
    index = [i for i in infos if "/index/" in i.path]
    run_bytes, index_bytes = sum(i.size for i in runs), sum(i.size for i in index)
    return {
        "objects": len(infos),
        "run_objects": len(runs),
        "run_bytes": run_bytes,
        "index_objects": len(index),
        "index_bytes": index_bytes,
        "runs": n_runs,
    }


def projection(measured: dict, target: int = 100_000) -> dict:
    """100k runs from the 1,000-run figures. Method: files and bytes scale linearly per run (6 files a run,
    bytes per run as measured; the index after compaction is 3 Delta files plus its log); index bytes
    linearly in rows; an aggregate scans every word_step_stats row, so its time scales linearly; a point
    read touches one run file and the index lookup, so it stays flat."""
    n = measured["runs"]
    k = target / n
    s = measured["sizes"]
    return {
        "runs": target,
        "run_objects": int(s["run_objects"] * k),
        "run_gb": round(s["run_bytes"] * k / 1e9, 2),
        "index_mb_after_compaction": round(s["index_bytes"] * k / 1e6, 1),
        "index_objects_after_compaction": 3 + 3 * 2,  # one data file per table and a few log entries
        "aggregate_local_s": round(measured["local"]["aggregate_p50_ms"] * k / 1000, 1),
        "aggregate_s3_direct_s": round(measured["s3_direct"]["aggregate_p50_ms"] * k / 1000, 1),
        "point_read_local_ms": measured["local"]["point_read_p50_ms"],
        "point_read_s3_direct_ms": measured["s3_direct"]["point_read_p50_ms"],
        "replica_cold_sync_min": round(measured["replica_cold_sync_s"] * k / 60, 1),
        "method": projection.__doc__.split("Method: ", 1)[1].replace("\n   ", "").strip(),
    }


def scale_results(n_runs: int = 1000) -> dict:
    """Everything above, as one entry of bench/results.json."""
    measured = local_vs_s3(n_runs)
    return {"throughput": throughput(), "local_vs_s3": measured, "projection_100k": projection(measured)}
