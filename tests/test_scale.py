"""Scale-out: S3 stores (a moto server on 127.0.0.1), Delta Lake commits from many processes, Ray batches.

Everything runs on the loopback: the S3 endpoint is a local moto server, the Ray cluster is started here
with its node bound to 127.0.0.1, and both are torn down at the end of the module.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jobs.batch import BatchError, BatchItem, batch_run_id, parse_seeds, read_prompts
from schema.location import StoreLocationError, parse_location
from stepx.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the AWS environment pointing at it (restored afterwards)."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "STEPX_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def new_bucket(s3: dict) -> str:
    import boto3

    name = f"stepx-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/lab"


def test_store_urls_parse_and_bad_ones_are_one_line(capsys):
    loc = parse_location("s3://lab-bucket/team/stepx/")
    assert (loc.bucket, loc.prefix, loc.url) == ("lab-bucket", "team/stepx", "s3://lab-bucket/team/stepx")
    assert loc.run_key("r1", "runs.parquet") == "lab-bucket/team/stepx/runs/r1/runs.parquet"
    assert parse_location("data/store") is None
    for bad in ("ftp://host/x", "s3://Upper/x", "s3://b/../x", "s3://"):
        with pytest.raises(StoreLocationError):
            parse_location(bad)
    assert main(["runs", "--store", "ftp://host/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s3://bucket/prefix" in err
    assert main(["generate", "a red circle", "--store", "s3://bucket/x"]) == 2
    assert "stepx batch" in capsys.readouterr().err


def test_batch_inputs_and_run_ids(tmp_path, capsys):
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("x", "5-2", "-1"):
        with pytest.raises(BatchError):
            parse_seeds(bad)
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a star", None]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["a star"]
    pq.write_table(pa.table({"text": ["a star"]}), tmp_path / "q.parquet")
    with pytest.raises(BatchError, match="no text column 'prompt'"):
        read_prompts(tmp_path / "q.parquet")
    for argv, said in (
        (["batch", str(tmp_path / "none.txt")], "no prompts file"),
        (["batch", str(tmp_path / "p.txt"), "--seeds", "9-1"], "ascending range"),
        (["batch", str(tmp_path / "q.parquet")], "no text column 'prompt'"),
        (["batch", str(tmp_path / "p.txt"), "--workers", "0"], "--workers"),
    ):
        assert main([*argv, "--store", str(tmp_path / "store")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
    assert not (tmp_path / "store" / "runs").exists()  # nothing half-written
    a, b = BatchItem("a red circle", 1), BatchItem("a red circle", 2)
    assert batch_run_id(a, "f1") == batch_run_id(BatchItem("a red circle", 1), "f1")
    assert len({batch_run_id(a, "f1"), batch_run_id(b, "f1"), batch_run_id(a, "f2")}) == 3


def _writer(url: str, folders: list[str], env: dict) -> None:
    os.environ.update(env)
    from pipeline.remote_index import publish_run
    from schema.location import parse_location

    loc = parse_location(url)
    for f in folders:
        publish_run(loc, Path(f), Path(f).name)


@pytest.mark.slow
def test_four_processes_commit_40_runs_exactly_once(s3, tmp_path):
    from jobs.synth import synth_store
    from pipeline.remote_index import maybe_compact, publish_run
    from store import Store
    from store.remote import sync

    synth_store(tmp_path / "local", 40, steps=3)
    folders = sorted(str(p) for p in (tmp_path / "local" / "runs").iterdir())
    url = new_bucket(s3)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, folders[i::4], s3)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    loc = parse_location(url)
    assert publish_run(loc, Path(folders[0]), Path(folders[0]).name) is False  # a retry commits nothing
    store = Store(sync(loc))
    runs = store.runs()
    assert sorted(r["run_id"] for r in runs) == sorted(Path(f).name for f in folders)
    for r in runs:  # every run readable: its tokens, a word map, its image
        word = store.words(r["run_id"])[0].word
        assert store.word_map(r["run_id"], word).shape == (16, 16)
        assert store.image(r["run_id"])[0][:4] in (b"\x89PNG", b"RIFF", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
    counts = store.sql("SELECT count(*), count(DISTINCT run_id) FROM tokens").rows[0]
    assert counts[0] == sum(len(store.tokens(r["run_id"])) for r in runs) and counts[1] == 40
    report = maybe_compact(loc)  # 40 commits: over the bound, so compacted to one file per table
    assert report["runs"] == (40, 1) and report["tokens"][1] == report["word_step_stats"][1] == 1
    assert maybe_compact(loc) is None
    assert len(Store(sync(loc)).runs()) == 40


@pytest.fixture(scope="module")
def ray_cluster(s3, tmp_path_factory):
    """A local Ray cluster with 2 CPU slots, its node on 127.0.0.1; the crash seam armed for one item."""
    # Ray resolves 127.0.0.1 to the machine's network address unless clusters are off: this keeps the GCS,
    # raylet and workers on the loopback (read when ray is first imported).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("ray") / "crashed"
    os.environ.update(STEPX_BATCH_CRASH_ONCE=str(marker), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield marker
    finally:
        ray.shutdown()
        os.environ.pop("STEPX_BATCH_CRASH_ONCE", None)


@pytest.mark.slow
def test_ray_builds_a_12_run_gallery_into_s3_with_a_killed_worker(s3, ray_cluster, tmp_path, capsys, monkeypatch):
    import ray

    from jobs.ray_batch import run_ray
    from store import Store
    from store.remote import local_root

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    url = new_bucket(s3)
    items = [
        BatchItem(p, s, 2, "scale")
        for p in ("a red circle", "a blue square", "a star", "a big tree")
        for s in (0, 1, 2)
    ]
    results = run_ray(items, url, "tiny-random", workers=2)
    assert ray_cluster.exists()  # a worker died in the middle of an item
    assert [r["status"] for r in results] == ["generated"] * 12
    assert sorted(r["attempts"] for r in results) == [1] * 11 + [2]  # that item was retried once, on a restart
    assert len({r["pid"] for r in results}) >= 2
    store = Store(local_root(url, max_age_s=0))
    assert sorted(r["run_id"] for r in store.runs()) == sorted(r["run_id"] for r in results)
    again = run_ray(items, url, "tiny-random", workers=2)  # the same job again: nothing new
    assert [r["status"] for r in again] == ["present"] * 12
    assert (
        main(["sql", "SELECT count(*) AS n FROM runs WHERE gallery = 'scale'", "--store", url, "--format", "json"]) == 0
    )
    out = capsys.readouterr().out  # Ray's own log lines (the killed worker) may come before the answer
    assert json.loads(out[out.index("[\n") :]) == [{"n": 12}]
    assert main(["sql", "SELECT * FROM read_text('/etc/passwd')", "--store", url]) == 2  # the sandbox holds
    capsys.readouterr()

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("STEPX_STORE", url)
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert {t.value for t in at.text} >= {"a red circle", "a blue square", "a star", "a big tree"}
    rid = results[0]["run_id"]
    at.session_state["run_id"] = rid
    at.switch_page("views/inspect.py").run()
    assert not at.exception, at.exception
    assert "circle" in at.radio(key="inspect_word").options or "red" in at.radio(key="inspect_word").options
    assert at.get("image")


@pytest.mark.slow
def test_stepx_batch_runs_locally_into_s3(s3, tmp_path):
    url = new_bucket(s3)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "stepx.cli",
        "batch",
        str(tmp_path / "p.txt"),
        "--seeds",
        "0-1",
        "--steps",
        "2",
        "--model",
        "tiny-random",
        "--store",
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["generated"] == 4
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert json.loads(again.stdout.strip().splitlines()[-1])["present"] == 4
    runs = subprocess.run(
        [sys.executable, "-m", "stepx.cli", "runs", "--store", url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO,
    )
    assert runs.returncode == 0 and runs.stdout.count("a red circle") == 2


@pytest.mark.slow
def test_dashboard_jobs_run_on_ray_with_progress_and_cancel(ray_cluster, tmp_path, monkeypatch):
    from jobs import queue, ray_jobs
    from jobs.worker import serve
    from store import Store

    monkeypatch.setenv("STEPX_RAY_ADDRESS", "local")  # the cluster this module started
    monkeypatch.delenv("STEPX_BATCH_CRASH_ONCE", raising=False)
    done = queue.submit(tmp_path, {"prompt": "a red circle", "model": "tiny-random", "steps": 3})
    gone = queue.submit(tmp_path, {"prompt": "a blue square", "model": "tiny-random", "steps": 3})
    queue.cancel(tmp_path, gone)
    assert serve(tmp_path, once=True, device="cpu") == 0
    job = queue.get(tmp_path, done)
    assert (job.status, job.step, job.total_steps, job.error) == ("done", 3, 3, None)
    assert job.worker_pid == os.getpid()  # claimed here; generated by the Ray actor, which wrote the run
    assert len(ray_jobs._ACTOR) == 1
    assert [r["run_id"] for r in Store(tmp_path).runs()] == [job.run_id]
    assert queue.get(tmp_path, gone).status == "cancelled"
