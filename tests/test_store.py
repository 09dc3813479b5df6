"""Trace files and the store: round trip, atomic runs, concurrent readers, index rebuild,
version refusal. Real Parquet, real DuckDB, real processes."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.synth import synth_store
from pipeline.index import rebuild_index, update_index
from schema import SCHEMA_VERSION, SchemaVersionError
from schema.maps import aggregate_levels
from store import GLOBAL, RunDataMissing, RunNotFound, Store, WordNotFound

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_metadata_tokens(traced_store):
    root, traces = traced_store
    store = Store(root)
    runs = store.runs()
    assert {r["run_id"] for r in runs} == {t.run["run_id"] for t in traces}
    trace = traces[0]
    run = store.run(trace.run["run_id"])
    assert run["prompt"] == trace.run["prompt"] and run["seed"] == 1 and run["steps"] == 4
    assert run["schema_version"] == SCHEMA_VERSION and run["levels"] == ["32x32", "16x16"]
    assert json.loads(run["config_json"])["model"] == "tiny-random"
    words = store.words(trace.run["run_id"])
    assert [w.word for w in words] == ["a", "red", "circle", "on", "the", "left", "and", "a", "blue", "square"]
    tokens = store.tokens(trace.run["run_id"])
    assert tokens[0]["kind"] == "start" and not tokens[0]["has_map"]
    assert tokens[-1]["kind"] == "end" and tokens[-1]["has_map"]


def test_round_trip_word_maps(traced_store):
    root, traces = traced_store
    store, trace = Store(root), traces[0]
    rid = trace.run["run_id"]
    stored = [t for t in trace.tokens if t.has_map]
    circle = [i for i, t in enumerate(stored) if t.word == "circle"]
    rec = trace.steps[2]
    expected = aggregate_levels([rec.cross[g][circle].mean(axis=0) for g in trace.levels], 32, 32)
    got = store.word_map(rid, "circle", step=2)
    assert got.shape == (32, 32)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5)  # float16 storage
    # all steps = sum of steps; Global = all word tokens; one level only
    total = sum(store.word_map(rid, "circle", step=s) for s in range(4))
    np.testing.assert_allclose(store.word_map(rid, "circle"), total, rtol=1e-4, atol=1e-6)
    words_only = [i for i, t in enumerate(stored) if t.kind == "word"]
    g16 = store.word_map(rid, GLOBAL, step=0, levels=["16x16"])
    np.testing.assert_allclose(
        g16,
        aggregate_levels([rec0 := trace.steps[0].cross[(16, 16)][words_only].mean(axis=0)], 32, 32),
        rtol=2e-3,
        atol=1e-5,
    )
    assert rec0.shape == (16, 16)
    with pytest.raises(WordNotFound, match="circle"):
        store.word_map(rid, "dog")


def test_round_trip_self_attention_and_images(traced_store):
    root, traces = traced_store
    store, trace = Store(root), traces[0]
    rid = trace.run["run_id"]
    agg = store.self_attention(rid)
    assert agg.grid == (32, 32)
    peak = trace.self_aggregate.max(axis=1, keepdims=True)
    assert np.all(np.abs(agg.matrix - trace.self_aggregate) <= peak / 255 * 0.51 + 1e-7)
    step = store.self_attention(rid, step=3)
    assert step.grid == (16, 16) and step.matrix.shape == (256, 256)
    data, fmt = store.image(rid)
    assert fmt == "png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(trace.final))
    data, fmt = store.image(rid, step=1)
    assert fmt == "webp" and Image.open(io.BytesIO(data)).size == trace.previews[1].size


def test_every_file_carries_schema_version(traced_store):
    root, traces = traced_store
    for f in (root / "runs" / traces[0].run["run_id"]).glob("*.parquet"):
        assert pq.ParquetFile(f).schema_arrow.metadata[b"stepx.schema_version"] == SCHEMA_VERSION.encode()


def test_sql_views_and_stats(traced_store):
    root, traces = traced_store
    store = Store(root)
    res = store.sql("SELECT count(*) FROM word_step_stats WHERE level = 'all' AND word_index = -1")
    assert res.rows == [(8,)]  # Global: 2 runs x 4 steps
    res = store.sql("SELECT word, round(avg(mass), 6) FROM word_stats GROUP BY word ORDER BY word LIMIT 3")
    assert res.columns == ["word", "round(avg(mass), 6)"] and len(res.rows) == 3
    res = store.sql("SELECT count(*) FROM cross_attention")
    assert res.rows[0][0] == 4 * 2 * 11 + 4 * 2 * 6  # steps x levels x stored tokens
    res = store.sql("SELECT * FROM range(5000)", max_rows=100)
    assert res.truncated and len(res.rows) == 100


def test_missing_and_unknown_runs(tmp_path):
    synth_store(tmp_path, 2, steps=3)
    store = Store(tmp_path)
    rid = store.runs()[0]["run_id"]
    with pytest.raises(RunNotFound):
        store.run("nope")
    shutil.rmtree(tmp_path / "runs" / rid)
    with pytest.raises(RunDataMissing, match=rid):
        store.word_map(rid, GLOBAL, step=0)
    report = rebuild_index(tmp_path)
    assert report.runs == 1 and rid not in {r["run_id"] for r in Store(tmp_path).runs()}


def _crash_writer(root: str, after_files: int) -> None:
    import pyarrow.parquet as pq_mod

    real = pq_mod.write_table
    count = {"n": 0}

    def dying_write(*args, **kwargs):
        if count["n"] == after_files:
            os.kill(os.getpid(), signal.SIGKILL)
        count["n"] += 1
        return real(*args, **kwargs)

    pq_mod.write_table = dying_write
    synth_store(Path(root), 1, steps=3, seed=9)


@pytest.mark.parametrize("after_files, complete", [(0, False), (3, False), (5, False), (6, True)])
def test_crash_mid_write_leaves_no_visible_run(tmp_path, after_files, complete):
    """Killed while writing the 6 run files: nothing visible. Killed while indexing (7th write):
    the run folder is complete but unindexed, so readers don't list it until the index catches up."""
    synth_store(tmp_path, 2, steps=3)
    before = {r["run_id"] for r in Store(tmp_path).runs()}
    proc = mp.get_context("spawn").Process(target=_crash_writer, args=(str(tmp_path), after_files))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    store = Store(tmp_path)
    assert {r["run_id"] for r in store.runs()} == before
    on_disk = {p.name for p in (tmp_path / "runs").iterdir()}
    assert len(on_disk - before) == int(complete)
    assert store.sql("SELECT count(*) FROM cross_attention").rows[0][0] > 0
    report = rebuild_index(tmp_path)
    assert report.runs == 2 + int(complete) and not report.bad_runs
    assert not any((tmp_path / "tmp").iterdir())


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from jobs.synth import synth_trace
    from pipeline.trace_writer import build_tables, write_tables
    import numpy as np
    from datetime import datetime, timedelta, UTC
    rng = np.random.default_rng(5)
    for i in range(int(sys.argv[2])):
        t = synth_trace(rng, datetime(2026, 5, 1, tzinfo=UTC) + timedelta(seconds=i), steps=3)
        write_tables(Path(sys.argv[1]), t.run["run_id"], build_tables(t), 3)
    """
)


def test_reads_while_another_process_writes(tmp_path):
    synth_store(tmp_path, 1, steps=3)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "12"], cwd=ROOT)
    store = Store(tmp_path)
    seen, reads = set(), 0
    deadline = time.time() + 120
    while writer.poll() is None and time.time() < deadline:
        runs = store.runs()
        seen.add(len(runs))
        store.word_map(runs[0]["run_id"], GLOBAL, step=0)
        store.sql("SELECT word, avg(mass) FROM word_step_stats GROUP BY word")
        reads += 1
    assert writer.wait(60) == 0
    assert len(Store(tmp_path).runs()) == 13
    assert reads > 5 and len(seen) > 1  # the reader saw the store grow, without lock errors


def test_index_compacts_segments(tmp_path):
    for i in range(20):
        synth_store(tmp_path, 1, steps=2, seed=i)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert len(manifest["run_ids"]) == 20
    assert len(manifest["segments"]["runs"]) < 8
    assert len(Store(tmp_path).runs()) == 20
    shutil.rmtree(tmp_path / "index")
    assert Store(tmp_path).runs() == []
    assert rebuild_index(tmp_path).runs == 20
    assert len(Store(tmp_path).runs()) == 20


def test_newer_schema_refused(tmp_path):
    synth_store(tmp_path, 2, steps=2)
    rid = sorted(p.name for p in (tmp_path / "runs").iterdir())[0]
    path = tmp_path / "runs" / rid / "runs.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"stepx.schema_version": b"2.0"}), path)
    report = rebuild_index(tmp_path)
    assert report.runs == 1 and rid in report.bad_runs and "schema 2.0" in report.bad_runs[rid]
    assert rid in Store(tmp_path).bad_runs()
    manifest = tmp_path / "index" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["schema_version"] = "3.1"
    manifest.write_text(json.dumps(data))
    with pytest.raises(SchemaVersionError, match="3.1"):
        Store(tmp_path).runs()


def test_update_index_is_idempotent(tmp_path):
    synth_store(tmp_path, 3, steps=2)
    assert update_index(tmp_path) == []
    assert len(Store(tmp_path).runs()) == 3
