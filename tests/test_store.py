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
from schema.codec import MAP_CODE_MAX
from schema.maps import aggregate_levels
from store import GLOBAL, IndexDamaged, RunDataMissing, RunNotFound, Store, WordNotFound

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_metadata_tokens(traced_store):
    root, traces = traced_store
    store = Store(root)
    runs = store.runs()
    assert {r["run_id"] for r in runs} == {t.run["run_id"] for t in traces}
    trace = traces[0]
    run = store.run(trace.run["run_id"])
    assert run["prompt"] == trace.run["prompt"] and run["seed"] == 1 and run["steps"] == 4
    assert run["schema_version"] == SCHEMA_VERSION and run["levels"] == ["32x32", "16x16", "mid-16x16"]
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
    expected = rec.daam[circle].mean(axis=0)  # DAAM's map, computed by the capture
    got = store.word_map(rid, "circle", step=2)
    assert got.shape == (32, 32)
    # stored as uint16 codes per token map (schema.codec): each within 0.5/65535 of its map's max, plus rounding
    bound = rec.daam[circle].reshape(len(circle), -1).max(axis=1).mean() * (0.5 / MAP_CODE_MAX + 2**-22)
    assert np.abs(got - expected).max() <= bound
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
    assert res.rows[0][0] == 4 * 4 * 11 + 4 * 4 * 6  # steps x (3 levels + DAAM 'all') x stored tokens
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
    assert not any(p.is_dir() for p in (tmp_path / "tmp").iterdir())


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


# -- a damaged index: one line that says to rebuild, and a rebuild that needs nothing but the run folders ----


def _manifest(root: Path) -> dict:
    return json.loads((root / "index" / "manifest.json").read_text())


def _segment(root: Path, table: str) -> Path:
    return root / "index" / _manifest(root)["segments"][table][0]["file"]


def _edit_manifest(root: Path, change) -> None:
    m = _manifest(root)
    change(m)
    (root / "index" / "manifest.json").write_text(json.dumps(m))


def _copy_segment(root: Path, src: str, dst: str) -> None:
    shutil.copyfile(_segment(root, src), _segment(root, dst))


def _unindexed_copy(root: Path) -> str:
    """A complete run folder the index doesn't list (what raw views would show if they trusted run_ids)."""
    src = sorted((root / "runs").iterdir())[0]
    shutil.copytree(src, root / "runs" / "20990101-000000-abcdef")
    return "20990101-000000-abcdef"


DAMAGE = {
    "garbage": lambda r: (r / "index" / "manifest.json").write_bytes(b"\x00\xff not json {"),
    "empty": lambda r: (r / "index" / "manifest.json").write_bytes(b""),
    "a list": lambda r: (r / "index" / "manifest.json").write_text("[1, 2]"),
    "deep nesting": lambda r: (r / "index" / "manifest.json").write_text("[" * 100_000),
    "no segments": lambda r: _edit_manifest(r, lambda m: m.pop("segments")),
    "run_ids text": lambda r: _edit_manifest(r, lambda m: m.update(run_ids="abc")),
    "generation text": lambda r: _edit_manifest(r, lambda m: m.update(generation="7")),
    "rows text": lambda r: _edit_manifest(r, lambda m: m["segments"]["runs"][0].update(rows="many")),
    "segment path": lambda r: _edit_manifest(r, lambda m: m["segments"]["runs"][0].update(file="../../etc/passwd")),
    "run id path": lambda r: _edit_manifest(r, lambda m: m["run_ids"].append("../../x")),
    "bad_runs list": lambda r: _edit_manifest(r, lambda m: m.update(bad_runs=[1])),
    "run_ids short": lambda r: _edit_manifest(r, lambda m: m["run_ids"].pop()),
    "run_ids extra": lambda r: _edit_manifest(r, lambda m: m["run_ids"].append(_unindexed_copy(r))),
    "truncated segment": lambda r: _segment(r, "runs").write_bytes(_segment(r, "runs").read_bytes()[:200]),
    "deleted segment": lambda r: _segment(r, "tokens").unlink(),
    "foreign segment": lambda r: _copy_segment(r, "tokens", "runs"),
    "text segment": lambda r: _segment(r, "word_step_stats").write_text("hello"),
    "index is a file": lambda r: (shutil.rmtree(r / "index"), (r / "index").write_text("x")),
    "manifest folder": lambda r: ((r / "index" / "manifest.json").unlink(), (r / "index" / "manifest.json").mkdir()),
}


def _cli(argv: list[str]) -> tuple[int, list[str]]:
    from contextlib import redirect_stderr, redirect_stdout

    from stepx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_index_says_one_line_and_rebuild_recovers(tmp_path, damage):
    root = tmp_path / "store"
    synth_store(root, 3, steps=2)
    runs = {r["run_id"] for r in Store(root).runs()}
    DAMAGE[damage](root)
    with pytest.raises(IndexDamaged, match="stepx index rebuild --store"):
        Store(root).runs()
    rid = sorted(runs)[0]
    for argv in (["runs"], ["show", rid], ["sql", "SELECT count(*) FROM runs"]):
        code, err = _cli([*argv, "--store", str(root)])
        assert code == 2 and len(err) == 1, (argv, err)
        assert "index is damaged" in err[0] and f"stepx index rebuild --store {root}" in err[0], err
    code, err = _cli(["index", "rebuild", "--store", str(root)])
    assert code == 0, err
    store = Store(root)
    assert {r["run_id"] for r in store.runs()} == runs
    assert store.sql("SELECT count(DISTINCT run_id) FROM cross_attention").rows == [(3,)]
    m = _manifest(root)
    keep = {"manifest.json", ".lock"} | {s["file"] for segs in m["segments"].values() for s in segs}
    keep |= {r["file"] for r in m["retired"]}
    assert {p.name for p in (root / "index").iterdir()} <= keep  # unlisted and foreign files removed


def test_writer_rebuilds_a_damaged_index(tmp_path):
    synth_store(tmp_path, 2, steps=2)
    (tmp_path / "index" / "manifest.json").write_text("{")
    synth_store(tmp_path, 1, steps=2, seed=5)  # the next writer finds the damage and rebuilds from run folders
    assert len(Store(tmp_path).runs()) == 3


def test_dashboard_says_the_index_is_damaged(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    synth_store(tmp_path, 2, steps=2)
    (tmp_path / "index" / "manifest.json").write_text('{"format": 1}')
    monkeypatch.setenv("STEPX_STORE", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    shown = [e.value for e in at.error] + [e.body for e in at.warning] + [m.value for m in at.markdown]
    assert any("index is damaged" in s and "stepx index rebuild" in s for s in shown), shown


def test_leftovers_are_cleaned_by_the_next_writer_and_rebuild(tmp_path):
    synth_store(tmp_path, 1, steps=2)
    idx = tmp_path / "index"
    orphans = [idx / "runs-000099-abcdef.parquet", idx / ".manifest.json.1.abcdef", idx / "junk"]
    for p in orphans:
        p.write_bytes(b"left by a writer that died")
    holder = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from pipeline.index import work_folder
        with work_folder(Path(sys.argv[1]), sys.argv[2]) as work:
            (work / "runs.parquet").write_bytes(b"half")
            print(work.name, flush=True)
            time.sleep(600)
        """
    )
    dead = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path), "dead-run"], cwd=ROOT, stdout=subprocess.PIPE)
    live = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path), "live-run"], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        dead_name, live_name = dead.stdout.readline().decode().strip(), live.stdout.readline().decode().strip()
        dead.send_signal(signal.SIGKILL)
        dead.wait(30)
        synth_store(tmp_path, 1, steps=2, seed=3)  # a writer: sweeps the dead writer's folder, keeps the live one's
        left = {p.name for p in (tmp_path / "tmp").iterdir()}
        assert dead_name not in left and live_name in left
        assert not any(p.exists() for p in orphans)
        assert rebuild_index(tmp_path).removed_tmp == 0  # the live writer still holds its folder
        assert live_name in {p.name for p in (tmp_path / "tmp").iterdir()}
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(30)
    report = rebuild_index(tmp_path)
    assert report.removed_tmp == 1 and not [p for p in (tmp_path / "tmp").iterdir() if p.name != ".lock"]
    assert len(Store(tmp_path).runs()) == 2


# -- run ids: checked before any path is built from them --------------------------------------------------

BAD_IDS = ["../../x", "../runs", "/etc/passwd", "", "a\x00b", ".", "..", "a/b", "x" * 300, " x", "-rf", "run\n"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_run_ids_are_refused_before_any_path(tmp_path, bad):
    from jobs.depth import depth_for_run
    from pipeline.depth import write_depth
    from schema.layout import InvalidRunId, run_dir, valid_run_id

    root = tmp_path / "store"
    synth_store(root, 1, steps=2)
    (tmp_path / "x").mkdir()  # what '../../x' would reach
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert not valid_run_id(bad)
    with pytest.raises(InvalidRunId):
        run_dir(root, bad)
    store = Store(root)
    for call in (
        store.run,
        store.image,
        store.depth,
        store.self_attention,
        store.tokens,
        store.steps,
        lambda r: store.word_map(r, GLOBAL),
        lambda r: depth_for_run(root, r, None),
    ):
        with pytest.raises(RunNotFound, match="not a run id"):
            call(bad)
    with pytest.raises(ValueError, match="not a run id"):
        write_depth(root, bad, np.zeros((4, 4), np.float32), "m", "metric")
    if "\x00" not in bad:
        for argv in (["show", bad], ["depth", bad]):
            code, err = _cli([*argv, "--store", str(root)])
            assert code == 2 and len(err) == 1 and "Traceback" not in err[0], (argv, err)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_unindexed_run_folder_is_not_reachable(tmp_path):
    from pipeline.depth import write_depth

    synth_store(tmp_path, 1, steps=2)
    rid = Store(tmp_path).runs()[0]["run_id"]
    shutil.copytree(tmp_path / "runs" / rid, tmp_path / "runs" / "20990101-000000-abcdef")
    store = Store(tmp_path)
    with pytest.raises(RunNotFound, match="no run"):
        store.image("20990101-000000-abcdef")
    with pytest.raises(FileNotFoundError):
        write_depth(tmp_path, "20990101-000000-abcdef", np.zeros((4, 4), np.float32), "m", "metric")
    assert not (tmp_path / "runs" / "20990101-000000-abcdef" / "depth.parquet").exists()
    assert store.sql("SELECT count(DISTINCT run_id) FROM images").rows == [(1,)]


def _write_float32_daam(folder: Path, trace) -> None:
    """Rewrite a run's cross_attention as schema 1.2-1.7 wrote it: the exact DAAM maps as float32 `daam_map`, no
    codes or scale columns, the version 1.7 (what a store written before 1.8 holds)."""
    import pyarrow as pa

    path = folder / "cross_attention.parquet"
    table = pq.read_table(path)
    stored = [t.token_index for t in trace.tokens if t.has_map]
    steps = {rec.step_index: rec for rec in trace.steps}
    maps = [
        steps[s].daam[stored.index(t)].reshape(-1).astype(np.float32) if level == "all" else None
        for s, t, level in zip(
            *(table.column(c).to_pylist() for c in ("step_index", "token_index", "level")), strict=True
        )
    ]
    table = table.drop_columns(["daam_codes", "daam_scale"])
    table = table.set_column(
        table.schema.get_field_index("daam_map"), "daam_map", pa.array(maps, pa.list_(pa.float32()))
    )
    options = {"use_dictionary": [c for c in table.column_names if c != "daam_map"]}  # as 1.2-1.7 wrote it
    old = table.replace_schema_metadata({b"stepx.schema_version": b"1.7"})
    pq.write_table(old, path, row_group_size=table.num_rows // len(steps), **options)


def test_float32_daam_maps_of_older_stores_stay_readable(tmp_path, traced_store):
    """A run written before schema 1.8 (float32 daam_map) reads back exactly as stored, beside a 1.8 run (uint16
    codes) in the same store, through Store.word_map and the SQL console's `daam_maps` and `cross_attention`."""
    src, traces = traced_store
    shutil.copytree(src, tmp_path / "store")
    root = tmp_path / "store"
    old_trace, new_trace = traces
    old_id, new_id = old_trace.run["run_id"], new_trace.run["run_id"]
    new_file = root / "runs" / new_id / "cross_attention.parquet"
    assert {"daam_codes", "daam_scale"} <= set(pq.read_schema(new_file).names)
    assert pq.read_table(new_file, columns=["daam_map"]).column(0).null_count == pq.read_metadata(new_file).num_rows
    _write_float32_daam(root / "runs" / old_id, old_trace)
    store = Store(root)
    stored = [t for t in old_trace.tokens if t.has_map]
    circle = [i for i, t in enumerate(stored) if t.word == "circle"]
    for s, rec in enumerate(old_trace.steps):  # read as stored: bit for bit the float32 maps
        np.testing.assert_array_equal(
            store.cross_maps(old_id, [stored[i].token_index for i in circle], step=s, levels=["all"])["all"][0],
            rec.daam[circle],
        )
    np.testing.assert_allclose(store.word_map(old_id, "circle", step=1), old_trace.steps[1].daam[circle].mean(axis=0))
    # SQL: the view decodes the 1.8 run with the reader's formula and passes the old run's floats through
    for rid, trace in ((old_id, old_trace), (new_id, new_trace)):
        token = next(t.token_index for t in trace.tokens if t.has_map)
        rows = store.sql(
            f"SELECT step_index, level_height, level_width, daam_map FROM daam_maps WHERE run_id = '{rid}' "
            f"AND token_index = {token} ORDER BY step_index"
        ).rows
        assert [r[0] for r in rows] == list(range(trace.run["steps"]))
        for step, h, w, values in rows:
            got = np.asarray(values, np.float32).reshape(h, w)
            np.testing.assert_array_equal(got, store.cross_maps(rid, [token], step=step, levels=["all"])["all"][0, 0])
    counts = store.sql("SELECT run_id, count(*) FROM cross_attention WHERE level = 'all' GROUP BY run_id").rows
    assert dict(counts) == {t.run["run_id"]: t.run["steps"] * sum(x.has_map for x in t.tokens) for t in traces}
