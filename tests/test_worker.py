"""The on-demand generation job: a real worker process, SIGKILL mid-run, retry, fast failures,
and two dashboard sessions submitting at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    return subprocess.Popen([sys.executable, "-m", "stepx.cli", "worker", "--poll", "0.2", *extra], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def wait_for(predicate, timeout: float = 180, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def request(prompt: str, steps: int, model: str = "tiny-random") -> dict:
    return {"prompt": prompt, "negative": "", "model": model, "seed": 1, "steps": steps, "guidance": 3.0,
            "width": 64, "height": 64}  # fmt: skip


def test_worker_runs_jobs_and_fails_fast_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    ok = queue.submit(tmp_path, request("a red circle", 3))
    missing = queue.submit(tmp_path, request("a red circle", 3, model="sd15"))
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
