"""Reliability battery: writers killed at random points, readers during writes, corrupt files,
deleted runs, newer schemas, and over 100 malformed inputs, each answered by a clear message."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from analysis.regions import RegionInputError, parse_bbox, parse_indices, parse_polygon
from jobs.synth import synth_store
from pipeline.index import list_run_dirs, rebuild_index
from schema import RUN_FILES
from schema.tables import OPTIONAL_FILES
from stepx.cli import main
from store import GLOBAL, RunDataMissing, RunNotFound, Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime, timedelta
    from pathlib import Path
    import numpy as np
    from jobs.synth import synth_trace
    from pipeline.trace_writer import build_tables, write_tables
    rng = np.random.default_rng(int(sys.argv[2]))
    print("ready", flush=True)
    for i in range(int(sys.argv[3])):
        t = synth_trace(rng, datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=int(sys.argv[2]), seconds=i), steps=3)
        write_tables(Path(sys.argv[1]), t.run["run_id"], build_tables(t), 3)
    """
)


def complete(root: Path, run_id: str) -> bool:
    folder = root / "runs" / run_id
    try:
        return all(
            pq.ParquetFile(folder / RUN_FILES[t]).metadata.num_rows > 0 for t in RUN_FILES if t not in OPTIONAL_FILES
        )
    except OSError:
        return False


def test_writer_killed_at_random_points_never_shows_half_a_run(tmp_path):
    rng = random.Random(7)
    for attempt in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(attempt), "50"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        store = Store(tmp_path)
        listed = [r["run_id"] for r in store.runs()]
        assert all(complete(tmp_path, r) for r in listed), f"attempt {attempt}: a listed run is incomplete"
        assert all(complete(tmp_path, r) for r in list_run_dirs(tmp_path)), "a half-written run folder is visible"
        if listed:
            store.word_map(listed[0], GLOBAL, step=0)
            assert store.sql("SELECT count(*) FROM word_step_stats").rows[0][0] > 0
    report = rebuild_index(tmp_path)
    assert report.runs == len(list_run_dirs(tmp_path)) and not report.bad_runs
    assert {r["run_id"] for r in Store(tmp_path).runs()} == set(list_run_dirs(tmp_path))
    assert not (tmp_path / "tmp").exists() or not any(p.is_dir() for p in (tmp_path / "tmp").iterdir())


READER = textwrap.dedent(
    """
    import sys, time
    from store import GLOBAL, Store
    store = Store(sys.argv[1])
    deadline = time.time() + float(sys.argv[2])
    reads = 0
    while time.time() < deadline:
        runs = store.runs()
        if runs:
            store.word_map(runs[-1]["run_id"], GLOBAL, step=0)
        store.sql("SELECT word, avg(mass) FROM word_step_stats GROUP BY word")
        reads += 1
    print(reads, len(store.runs()))
    """
)


def test_reader_process_during_writer_process(tmp_path):
    synth_store(tmp_path, 1, steps=3)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path), "15"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "99", "15"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.wait(120) == 0, writer.stderr.read()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    reads, _ = map(int, out.split())
    assert reads > 5 and "lock" not in err.lower()
    assert len(Store(tmp_path).runs()) == 16


def test_corrupt_truncated_deleted_and_newer_runs_are_isolated(tmp_path, monkeypatch):
    synth_store(tmp_path, 5, steps=3, seed=11)
    runs = sorted(list_run_dirs(tmp_path))
    truncated, corrupt, deleted, newer, good = runs
    path = tmp_path / "runs" / truncated / "cross_attention.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "runs" / corrupt / "runs.parquet").write_bytes(b"not a parquet file at all")
    shutil.rmtree(tmp_path / "runs" / deleted)
    table = pq.read_table(tmp_path / "runs" / newer / "tokens.parquet")
    pq.write_table(
        table.replace_schema_metadata({b"stepx.schema_version": b"7.0"}), tmp_path / "runs" / newer / "tokens.parquet"
    )
    store = Store(tmp_path)
    assert store.word_map(good, GLOBAL, step=0).shape == (16, 16)
    with pytest.raises(RunDataMissing, match=truncated):
        store.word_map(truncated, GLOBAL, step=2)
    with pytest.raises(RunDataMissing, match=deleted):
        store.image(deleted)
    report = rebuild_index(tmp_path)
    assert set(report.bad_runs) == {corrupt, newer}
    assert "7.0" in report.bad_runs[newer]
    store = Store(tmp_path)
    assert {r["run_id"] for r in store.runs()} == {truncated, good}
    assert store.bad_runs().keys() == {corrupt, newer}
    # raw views read indexed runs only (truncated, good), and leave the truncated file out: bad runs stay invisible
    assert store.sql("SELECT list(DISTINCT run_id) FROM cross_attention").rows == [([good],)]
    assert store.sql("SELECT count(DISTINCT run_id) FROM images").rows == [(2,)]
    assert list(store.unreadable_files()) == [f"runs/{truncated}/cross_attention.parquet"]
    monkeypatch.setenv("STEPX_STORE", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert any("2 unreadable runs" in e.label for e in at.expander)
    at.session_state["run_id"] = truncated
    at.switch_page("views/inspect.py").run()
    assert not at.exception and any(truncated in e.value.replace("\\", "") for e in at.error)


CLI_CASES = [
    [],
    ["generate"],
    ["generate", ""],
    ["generate", " \t "],
    ["generate", "a\x00b"],
    ["generate", "a\x1bcat"],
    ["generate", "x" * 12000],
    ["generate", "a cat", "--steps", "0"],
    ["generate", "a cat", "--steps", "-1"],
    ["generate", "a cat", "--steps", "1e3"],
    ["generate", "a cat", "--steps", ""],
    ["generate", "a cat", "--seed", "x"],
    ["generate", "a cat", "--seed", "-5"],
    ["generate", "a cat", "--seed", str(2**64)],
    ["generate", "a cat", "--guidance", "abc"],
    ["generate", "a cat", "--guidance", "-1"],
    ["generate", "a cat", "--guidance", "inf"],
    ["generate", "a cat", "--guidance", "51"],
    ["generate", "a cat", "--width", "63"],
    ["generate", "a cat", "--width", "0"],
    ["generate", "a cat", "--height", "7"],
    ["generate", "a cat", "--height", "1.5"],
    ["generate", "a cat", "--width", "-64"],
    ["generate", "a cat", "--model", ""],
    ["generate", "a cat", "--model", "sd99"],
    ["generate", "a cat", "--model-path", "/definitely/not/here"],
    ["generate", "a cat", "--device", "tpu"],
    ["generate", "a cat", "--bogus"],
    ["runs", "--limit", "0"],
    ["runs", "--limit", "many"],
    ["show"],
    ["show", "nope"],
    ["sql"],
    ["sql", ""],
    ["sql", "DELETE FROM runs"],
    ["sql", "SELECT 1", "--format", "xml"],
    ["sql", "SELECT * FROM read_csv('/etc/passwd')"],
    ["sql", "SELECT 1", "--max-rows", "0"],
    ["index"],
    ["index", "destroy"],
    ["gallery", "build", "--spec", "/no/such.json"],
    ["annotate", "--out", "x.json"],
    ["annotate", "--gallery", "g", "--run", "r", "--out", "x.json"],
    ["annotate", "--run", "nope", "--out", "x.json"],
    ["annotate", "--gallery", "none", "--out", "x.json", "--threshold", "2"],
    ["synth", "--runs", "0"],
    ["synth"],
    ["eval", "--n", "0"],
    ["depth"],
    ["depth", "nope"],
    ["worker", "--device", "gpu"],
    ["models", "--x"],
    ["--version-please"],
    ["generate", "a cat", "--negative", "bad\x07"],
    ["runs", "--tag"],
    ["sql", "SELECT 1", "--timeout", "soon"],
    ["generate", "a cat", "--width", "8192"],
]

REGION_CASES = (
    [
        (parse_indices, t)
        for t in [
            "",
            ",",
            "a",
            "1.5",
            "-1",
            "1024",
            "5-2",
            "0-1024",
            "1,,x",
            "1 2",
            "0x10",
            "١٢",
            "1-",
            "-",
            "999999999999999999999",
            "1;2",
            "🙂",
        ]
    ]
    + [
        (parse_bbox, t)
        for t in [
            "",
            "1,2,3",
            "1,2,3,4,5",
            "a,b,c,d",
            "10,10,5,20",
            "0,0,65,10",
            "-1,0,5,5",
            "5,5,5,9",
            "0,0,0,0",
            "1e9,0,2e9,1",
            "nan,0,1,1",
            "0,0,10",
            "🙂,1,2,3",
            "1;2;3;4",
        ]
    ]
    + [
        (parse_polygon, t)
        for t in [
            "",
            "0,0",
            "0,0 10,10",
            "0,0 10,10 20,20",
            "0,0 64,64 64,0 0,64",
            "0,0 10 10,10",
            "0,0 70,0 0,10",
            "x,1 2,3 4,5",
            "0,0 0,0 0,0",
            "-1,0 5,5 0,5",
            "0,0 10,0 nan,5",
            "1 2 3",
            "0,0 64,0 64,64 0,64 64,0",
            "🙂 1 2 3 4 5",
        ]
    ]
)


def test_over_100_malformed_inputs_get_clear_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPX_STORE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.chdir(tmp_path)
    assert len(CLI_CASES) + len(REGION_CASES) >= 100
    for argv in CLI_CASES:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert code != 0, argv
        assert len(lines) == 1 and "Traceback" not in err.getvalue(), (argv, err.getvalue())
        assert lines[0].startswith("stepx"), (argv, lines)
    for parser, text in REGION_CASES:
        with pytest.raises(RegionInputError) as exc:
            if parser is parse_indices:
                parser(text, (32, 32))
            else:
                parser(text, (64, 64))
        message = str(exc.value)
        assert message and "\n" not in message and len(message) < 300, (text, message)


def test_prompt_edge_cases_generate(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for prompt in ("word " * 500, "a 🙂 and a 🐱 on the left", "ünïcödé café"):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "stepx.cli",
                "generate",
                prompt,
                "--model",
                "tiny-random",
                "--steps",
                "2",
                "--store",
                str(tmp_path),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
        )
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    runs = Store(tmp_path).runs()
    assert len(runs) == 3
    long = next(r for r in runs if r["prompt"].startswith("word word"))
    assert Store(tmp_path).run(long["run_id"])["prompt_truncated"] is True


STEP_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import UTC, datetime
    from pathlib import Path
    import numpy as np
    import pipeline.index as index
    from jobs.synth import synth_trace
    from pipeline.trace_writer import build_tables, write_tables
    kill_at = int(sys.argv[2])
    seen = []

    def hook(name):
        seen.append(name)
        print(name, flush=True)
        if len(seen) - 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    index.STEP_HOOK = hook
    trace = synth_trace(np.random.default_rng(3), datetime(2026, 4, 1, tzinfo=UTC), steps=3)
    write_tables(Path(sys.argv[1]), trace.run["run_id"], build_tables(trace), 3)
    print("done", flush=True)
    """
)
VIEWS = ("runs", "tokens", "word_step_stats", "word_stats", "cross_attention", "self_attention", "images")


def visible(root: Path) -> dict[str, set[str]]:
    """Run ids each SQL view shows (a fresh Store, as a new reader process would open it)."""
    store = Store(root)
    return {v: {r[0] for r in store.sql(f"SELECT DISTINCT run_id FROM {v}", max_rows=10_000).rows} for v in VIEWS}


def index_leftovers(root: Path) -> set[str]:
    """Files in index/ that the manifest neither lists nor keeps for readers."""
    m = json.loads((root / "index" / "manifest.json").read_text())
    keep = {"manifest.json", ".lock"} | {s["file"] for segs in m["segments"].values() for s in segs}
    keep |= {r["file"] for r in m["retired"]}
    return {p.name for p in (root / "index").iterdir()} - keep


def tmp_leftovers(root: Path) -> list[str]:
    return [p.name for p in (root / "tmp").iterdir() if p.name != ".lock"] if (root / "tmp").exists() else []


def test_writer_killed_at_every_write_step_never_shows_a_run_outside_runs(tmp_path):
    """SIGKILL a real writer process after each durable write step in turn (files, rename, index segments,
    merges, manifest): after every kill each view shows exactly the runs `runs` lists, the store answers,
    and the next writer (or a rebuild) recovers and leaves no temporary folders or unlisted segments."""
    base = tmp_path / "base"
    for i in range(7):  # 7 tier-0 segments: the next write merges them, so merge steps are killed too
        synth_store(base, 1, steps=2, seed=100 + i)
    before = {r["run_id"] for r in Store(base).runs()}
    steps_seen: list[str] = []
    kill_at = 0
    while True:
        root = tmp_path / f"k{kill_at}"
        shutil.copytree(base, root)
        proc = subprocess.run(
            [sys.executable, "-c", STEP_WRITER, str(root), str(kill_at)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = proc.stdout.splitlines()
        if proc.returncode == 0:
            assert lines[-1] == "done" and len(lines) - 1 == kill_at, proc.stdout
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        steps_seen.append(lines[-1])
        views = visible(root)
        listed = views["runs"]
        assert listed in (before, before | set(list_run_dirs(root))), (kill_at, lines[-1])
        for view, ids in views.items():
            assert ids == listed, f"killed after {lines[-1]!r}: {view} shows {sorted(ids ^ listed)} beyond runs"
        new = set(list_run_dirs(root)) - before
        for run_id in new - listed:  # complete on disk but not yet indexed: unreachable by id too
            with pytest.raises(RunNotFound):
                Store(root).image(run_id)
        # recovery: the next writer indexes a renamed run and removes the dead writer's leftovers
        synth_store(root, 1, steps=2, seed=999)
        after = visible(root)
        assert after["runs"] == set(list_run_dirs(root)) and len(after["runs"]) == len(before | new) + 1
        assert all(ids == after["runs"] for ids in after.values())
        assert tmp_leftovers(root) == [] and index_leftovers(root) == set(), (lines[-1], tmp_leftovers(root))
        assert rebuild_index(root).runs == len(list_run_dirs(root))
        shutil.rmtree(root)
        kill_at += 1
    names = " ".join(steps_seen)
    for step in (
        "created tmp folder",
        "wrote runs.parquet",
        "wrote images.parquet",
        "renamed into runs/",
        "renamed manifest.json",
        "wrote .manifest.json",
    ):
        assert step in names, step
    assert sum(s.startswith("renamed runs-") for s in steps_seen) == 2  # the new segment and the merged one
    assert kill_at >= 20
