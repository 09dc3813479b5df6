"""The on-demand generation job: a real worker process, SIGKILL mid-run, retry, fast failures,
and two dashboard sessions submitting at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from jobs import queue
from store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def start_worker(store: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPX_STORE": str(store)}
    return subprocess.Popen(
        [sys.executable, "-m", "stepx.cli", "worker", "--poll", "0.2", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(predicate, timeout: float = 180, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def request(prompt: str, steps: int, model: str = "tiny-random") -> dict:
    return {
        "prompt": prompt,
        "negative": "",
        "model": model,
        "seed": 1,
        "steps": steps,
        "guidance": 3.0,
        "width": 64,
        "height": 64,
    }


def test_worker_runs_jobs_and_fails_fast_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    ok = queue.submit(tmp_path, request("a red circle", 3))
    missing = queue.submit(tmp_path, {**request("a red circle", 3, model="sd15"), "width": 512, "height": 512})
    env_worker = start_worker(tmp_path, "--once")
    assert env_worker.wait(300) == 0, env_worker.stderr.read().decode()
    done, failed = queue.get(tmp_path, ok), queue.get(tmp_path, missing)
    assert done.status == "done" and done.step == 3 and Store(tmp_path).run(done.run_id)["prompt"] == "a red circle"
    assert failed.status == "failed" and "not found in the Hugging Face cache" in failed.error
    assert failed.finished_at - failed.started_at < 5  # fails fast, before any model loads


def test_worker_killed_mid_job_leaves_no_run_and_retries_once(tmp_path):
    job_id = queue.submit(tmp_path, request("a blue square", 40))
    for attempt in (1, 2):
        worker = start_worker(tmp_path)
        wait_for(
            lambda: (j := queue.get(tmp_path, job_id)).status == "running" and j.step >= 2 and j.attempts == attempt,  # noqa: B023
            what=f"attempt {attempt} to be running",
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
        assert Store(tmp_path).runs() == []
    final = start_worker(tmp_path, "--once")
    assert final.wait(120) == 0
    job = queue.get(tmp_path, job_id)
    assert job.status == "failed" and "2 times" in job.error
    assert Store(tmp_path).runs() == []
    # a retried job that completes: killed once, then done
    again = queue.submit(tmp_path, request("a green triangle", 20))
    worker = start_worker(tmp_path)
    wait_for(lambda: (j := queue.get(tmp_path, again)).status == "running" and j.step >= 2, what="running")
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    finisher = start_worker(tmp_path, "--once")
    assert finisher.wait(300) == 0
    job = queue.get(tmp_path, again)
    assert job.status == "done" and job.attempts == 2
    assert [r["run_id"] for r in Store(tmp_path).runs()] == [job.run_id]


def test_two_sessions_submit_at_once_both_get_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPX_STORE", str(tmp_path))
    inspect = str(ROOT / "dashboard" / "views" / "inspect.py")
    sessions = []
    for prompt in ("a red circle", "a yellow square"):
        at = AppTest.from_file(inspect, default_timeout=120)
        at.run()
        assert not at.exception
        at.selectbox(key="gen_model").set_value("tiny-random").run()
        at.text_area(key="gen_prompt").input(prompt).run()
        at.number_input(key="gen_steps_tiny-random").set_value(3).run()
        sessions.append(at)
    for at in sessions:
        at.button(key="gen_go").click().run()
        assert not at.exception
    ids = [at.session_state["my_jobs"][0] for at in sessions]
    assert len(set(ids)) == 2 and all(queue.get(tmp_path, i).status == "queued" for i in ids)
    worker = start_worker(tmp_path, "--once")
    assert worker.wait(300) == 0
    finished = [queue.get(tmp_path, i) for i in ids]
    assert all(j.status == "done" for j in finished)
    assert {Store(tmp_path).run(j.run_id)["prompt"] for j in finished} == {"a red circle", "a yellow square"}
    for at in sessions:
        at.run()
        assert not at.exception


def runs_on_disk(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "runs").iterdir()) if (store / "runs").exists() else []


def test_queue_positions_elapsed_cancel_and_limits(tmp_path):
    import sqlite3

    ids = [queue.submit(tmp_path, request(f"job {i}", 3)) for i in range(3)]
    assert [queue.get(tmp_path, i).position for i in ids] == [1, 2, 3]
    assert queue.get(tmp_path, ids[0]).elapsed_s() is None and queue.get(tmp_path, ids[0]).waited_s() >= 0
    assert queue.cancel(tmp_path, ids[0]) == "cancelled"
    assert queue.cancel(tmp_path, ids[0]) == "cancelled"  # asking twice is harmless
    assert [queue.position(tmp_path, i) for i in ids] == [None, 1, 2]
    with pytest.raises(queue.JobError, match="no job 999"):
        queue.cancel(tmp_path, 999)
    job = queue.claim(tmp_path)
    assert job.job_id == ids[1] and job.position is None and job.elapsed_s() >= 0
    assert job.run_id == queue.get(tmp_path, ids[1]).run_id  # fixed when queued, the same for every attempt
    assert queue.cancel(tmp_path, job.job_id) == "cancelling"
    assert queue.progress(tmp_path, job, 1, 3) is False  # the worker learns at its next step
    queue.finish(tmp_path, job, error="cancelled while running", cancelled=True)
    assert queue.get(tmp_path, job.job_id).status == "cancelled"
    assert queue.claim(tmp_path).job_id == ids[2]
    queue.recover(tmp_path, force=True)  # as a restarted worker would: back in the queue, same run id
    assert queue.get(tmp_path, ids[2]).status == "queued"
    stale, fresh = queue.submit(tmp_path, request("stale", 3)), queue.submit(tmp_path, request("fresh", 3))
    with sqlite3.connect(queue.queue_path(tmp_path)) as con:
        for job_id, age in ((stale, queue.HEARTBEAT_STALE_S + 5), (fresh, 1)):
            con.execute(
                "UPDATE jobs SET status = 'running', attempts = 1, worker_pid = ?, heartbeat_at = ? WHERE job_id = ?",
                (os.getpid(), time.time() - age, job_id),  # even our own PID: only the heartbeat's age counts
            )
    assert queue.recover(tmp_path) == [stale]
    assert queue.get(tmp_path, stale).status == "queued" and queue.get(tmp_path, fresh).status == "running"
    finished = queue.submit(tmp_path, request("done", 3))
    with sqlite3.connect(queue.queue_path(tmp_path)) as con:
        con.execute("UPDATE jobs SET status = 'done' WHERE job_id = ?", (finished,))
    with pytest.raises(queue.JobError, match=r"already finished \(done\)"):
        queue.cancel(tmp_path, finished)
    for bad, message in [
        ({**request("x", 3, "shapes"), "width": 1024}, "128"),
        ({**request("x", 3), "steps": 5000}, "steps"),
        ({**request("x", 3), "steps": "20"}, "steps must be a number"),
        ({**request("", 3)}, "empty"),
        ({"prompt": "a cat"}, "'model'"),
        ({"kind": "depth", "run_id": "../../x"}, "run id"),
    ]:
        with pytest.raises(queue.JobError, match=message):
            queue.submit(tmp_path, bad)
    env = {**os.environ, "STEPX_STORE": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "stepx.cli", "jobs", "cancel", str(ids[2])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "cancelled" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "stepx.cli", "jobs", "cancel", "12345"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["stepx jobs: no job 12345 in the queue"]
    res = subprocess.run([sys.executable, "-m", "stepx.cli", "jobs"], cwd=ROOT, env=env, capture_output=True, text=True)
    statuses = [line.split()[1] for line in res.stdout.splitlines()[2:]]
    assert res.returncode == 0 and statuses.count("cancelled") == 3 and len(statuses) == 6


def test_malformed_rows_fail_alone_and_the_worker_goes_on(tmp_path):
    import json
    import sqlite3

    first = queue.submit(tmp_path, request("a red circle", 2))
    good = json.dumps(request("a green circle", 2))
    bad_rows = [
        ("not json at all", 0, "queued", None),
        ("[1, 2]", 0, "queued", None),
        (json.dumps({"model": "tiny-random"}), 0, "queued", None),
        (json.dumps({**request("x", 2), "steps": "many"}), 0, "queued", None),
        (json.dumps({**request("x", 2), "width": 100000}), 0, "queued", None),
        (good, "zero", "queued", None),  # text in an integer column: runs
        (good, "x", "running", "soon"),  # a running row with a text heartbeat: recovered, then runs
    ]
    with sqlite3.connect(queue.queue_path(tmp_path)) as con:
        bad_ids = [
            con.execute(
                "INSERT INTO jobs (created_at, status, request, attempts, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                ("yesterday", status, req, attempts, beat),
            ).lastrowid
            for req, attempts, status, beat in bad_rows
        ]
    last = queue.submit(tmp_path, request("a blue square", 2))
    assert len(queue.recent(tmp_path, 50)) == 9  # listing never fails on a bad row
    worker = start_worker(tmp_path, "--once")
    assert worker.wait(300) == 0, worker.stderr.read().decode()
    jobs = {i: queue.get(tmp_path, i) for i in [first, *bad_ids, last]}
    for i in bad_ids[:5]:
        assert jobs[i].status == "failed" and jobs[i].error.startswith("unusable job: "), jobs[i]
    assert "not valid JSON" in jobs[bad_ids[0]].error and "'prompt'" in jobs[bad_ids[2]].error
    assert "width" in jobs[bad_ids[4]].error
    done = [first, bad_ids[5], bad_ids[6], last]
    assert all(jobs[i].status == "done" for i in done), [jobs[i] for i in done]
    assert sorted(runs_on_disk(tmp_path)) == sorted(jobs[i].run_id for i in done)


KILLING_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import pipeline.index as index

    def hook(name):
        if name == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)

    index.STEP_HOOK = hook
    from stepx.cli import main
    sys.exit(main(["worker", "--store", sys.argv[1], "--poll", "0.2"]))
    """
)


@pytest.mark.parametrize("step", ["renamed into runs/", "renamed manifest.json"])
def test_worker_killed_after_its_run_appeared_never_yields_a_second_run(tmp_path, step):
    job_id = queue.submit(tmp_path, request("a red circle", 3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLING_WORKER, str(tmp_path), step], cwd=ROOT, env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    job = queue.get(tmp_path, job_id)
    assert job.status == "running" and runs_on_disk(tmp_path) == [job.run_id]
    finisher = start_worker(tmp_path, "--once")
    assert finisher.wait(300) == 0, finisher.stderr.read().decode()
    job = queue.get(tmp_path, job_id)
    assert job.status == "done" and job.attempts == 2
    assert runs_on_disk(tmp_path) == [job.run_id]
    assert [r["run_id"] for r in Store(tmp_path).runs()] == [job.run_id]


SAME_PID = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from jobs import queue
    job = queue.claim(Path(sys.argv[1]))
    print(os.getpid(), job.job_id, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "stepx.cli", "worker", "--once", "--store", sys.argv[1]])
    """
)


def test_worker_restarted_with_the_same_pid_recovers_its_job(tmp_path):
    """A worker that comes back under its old PID (PID 1 in a container) must not take its old job for live."""
    job_id = queue.submit(tmp_path, request("a red circle", 2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", SAME_PID, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    pid, claimed = map(int, res.stdout.split())
    job = queue.get(tmp_path, job_id)
    assert claimed == job_id and job.status == "done" and job.attempts == 2 and job.worker_pid == pid
    assert runs_on_disk(tmp_path) == [job.run_id]


SLOW_STEP_WORKER = textwrap.dedent(
    """
    import sys, time
    from jobs import queue
    real = queue.progress

    def slow(store, job, step, total):
        ok = real(store, job, step, total)
        if step == 2 and job.request["prompt"] == "slow":
            print("slow step", flush=True)
            time.sleep(9)
        return ok

    queue.progress = slow
    from stepx.cli import main
    sys.exit(main(["worker", "--store", sys.argv[1], "--poll", "0.2"]))
    """
)


def test_heartbeat_during_a_long_step_and_cancel_stops_the_job(tmp_path):
    slow = queue.submit(tmp_path, request("slow", 6))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-c", SLOW_STEP_WORKER, str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert worker.stdout.readline().strip() == b"slow step"
        first = queue.get(tmp_path, slow)
        time.sleep(queue.BEAT_S * 2.5)
        later = queue.get(tmp_path, slow)
        assert first.step == later.step == 2 and later.heartbeat_at > first.heartbeat_at  # beats within a step
        assert queue.live_worker(tmp_path) is not None  # so the dashboard never says "No worker is running"
        res = subprocess.run(
            [sys.executable, "-m", "stepx.cli", "jobs", "cancel", str(slow), "--store", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0 and "next step" in res.stdout
        job = wait_for(lambda: (j := queue.get(tmp_path, slow)).status == "cancelled" and j, what="cancelled")
        assert job.step == 2 and runs_on_disk(tmp_path) == [] and Store(tmp_path).runs() == []
        tmp = tmp_path / "tmp"
        assert not tmp.exists() or not [p for p in tmp.iterdir() if p.name != ".lock"]
        after = queue.submit(tmp_path, request("a blue square", 2))  # the worker goes on serving
        done = wait_for(lambda: (j := queue.get(tmp_path, after)).status == "done" and j, what="next job done")
        assert runs_on_disk(tmp_path) == [done.run_id]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)


def test_jobs_on_a_stored_run_end_in_one_line_when_the_run_is_missing(tmp_path):
    """Probe and depth jobs share one shell (`worker._run_on_stored_run`): a run the store lacks ends the job with
    the store's one-line reason, a job cancelled before it starts never runs, and the queue serves on."""
    from jobs import worker

    run_id = "20260101-000000-abcdef"
    probe = queue.submit(tmp_path, {"kind": "probe", "run_id": run_id, "words": ["dog"]})
    depth = queue.submit(tmp_path, {"kind": "depth", "run_id": run_id})
    for expected in (probe, depth):
        job = queue.claim(tmp_path)
        assert job.job_id == expected
        worker.run_job(tmp_path, job, {}, "cpu")
        done = queue.get(tmp_path, expected)
        assert done.status == "failed" and run_id in done.error and len(done.error.splitlines()) == 1, done.error
        assert "Traceback" not in done.error
    cancelled = queue.submit(tmp_path, {"kind": "depth", "run_id": run_id})
    job = queue.claim(tmp_path)
    queue.cancel(tmp_path, cancelled)
    worker.run_job(tmp_path, job, {}, "cpu")
    assert queue.get(tmp_path, cancelled).status == "cancelled"
