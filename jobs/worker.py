"""`stepx worker`: run queued generation jobs one at a time on the best device.

    stepx worker [--store DIR] [--once] [--poll 0.5]

A file lock keeps one worker per store, so a worker that takes it recovers every job left `running`
(whatever PID ran it). A heartbeat thread records the worker and its job every few seconds, during
long steps and model loads too. Each job writes the run id fixed when it was queued, and a run
already on disk under that id is indexed instead of generated again: a retried job never yields two
runs. A cancelled job stops at its next step and writes nothing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from jobs import queue


class JobCancelled(Exception):
    """Raised from the step callback when the job was cancelled (or taken over) meanwhile."""


@contextmanager
def heartbeat(store: Path, device: str, current: dict) -> Iterator[None]:
    """Beat for the worker (and for current['job'], when set) every queue.BEAT_S seconds, from a thread."""
    stop = threading.Event()
    pid, started = os.getpid(), time.time()

    def beat() -> None:
        while True:
            try:
                queue.worker_beat(store, pid, started, device)
                job = current.get("job")
                if job is not None:
                    queue.beat_job(store, job)
            except sqlite3.Error as exc:  # a busy or damaged queue file: say so, keep beating
                print(f"stepx worker: heartbeat failed: {exc}", file=sys.stderr, flush=True)
            if stop.wait(queue.BEAT_S):
                return

    thread = threading.Thread(target=beat, name="stepx-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def run_job(store: Path, job: queue.Job, models: dict, device: str | None) -> None:
    """Generate one job's request and record the outcome (done, failed with the reason, or cancelled)."""
    from pipeline.generate import GenerationConfig, GenerationError, generate_trace
    from pipeline.index import update_index
    from pipeline.models import ModelNotFoundError, load_model
    from pipeline.trace_writer import write_trace
    from schema.layout import run_dir

    req = job.request
    if req.get("kind") == "depth":
        run_depth_job(store, job)
        return
    if req.get("kind") == "probe":
        run_probe_job(store, job, device)
        return
    try:
        if run_dir(store, job.run_id).is_dir():  # an earlier attempt wrote it before its worker died
            update_index(store)
            queue.finish(store, job, run_id=job.run_id)
            return
        name = req["model"]
        if name not in models:
            models.clear()  # one model in memory at a time
            models[name] = load_model(name, device=device)
        model = models[name]
        config = GenerationConfig(
            prompt=req["prompt"],
            negative_prompt=req.get("negative", ""),
            seed=int(req.get("seed", 0)),
            steps=req.get("steps"),
            guidance=req.get("guidance"),
            width=req.get("width"),
            height=req.get("height"),
            tags=list(req.get("tags", [])),
        )

        def on_step(step: int, total: int) -> None:
            if not queue.progress(store, job, step, total):
                raise JobCancelled

        trace = generate_trace(model, config, on_step=on_step)
        if not queue.wanted(store, job):
            raise JobCancelled
        trace.run["run_id"] = job.run_id
        run_id = write_trace(store, trace, exist_ok=True).run_id
    except JobCancelled:
        queue.finish(store, job, error="cancelled while running", cancelled=True)
        return
    except (GenerationError, ModelNotFoundError, ValueError) as exc:
        queue.finish(store, job, error=str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the worker keeps serving; the job records why it failed
        queue.finish(store, job, error=f"{type(exc).__name__}: {exc}")
        return
    queue.finish(store, job, run_id=run_id)


def run_probe_job(store: Path, job: queue.Job, device: str | None) -> None:
    """Probe an existing run (`jobs.probe`); a run that doesn't reproduce fails the job with the reason."""
    from jobs.probe import probe_run
    from pipeline.generate import GenerationError

    req = job.request
    _run_on_stored_run(store, job, lambda: probe_run(store, req["run_id"], list(req["words"]), device), GenerationError)


def run_depth_job(store: Path, job: queue.Job) -> None:
    """Estimate depth for an existing run (the store checks its id against the index first)."""
    from jobs.depth import depth_for_run
    from pipeline.depth import load_depth_model
    from store import Store

    run_id, model = job.request["run_id"], job.request.get("depth_model", "zoedepth")

    def work() -> None:
        Store(store).run(run_id)  # a missing run fails in one line before any depth model loads
        depth_for_run(store, run_id, load_depth_model(model))

    _run_on_stored_run(store, job, work)


def _run_on_stored_run(store: Path, job: queue.Job, work: Callable[[], object], *expected: type[Exception]) -> None:
    """The shell of a job on a stored run: cancel check, `work`, progress; a failure ends the job with one line
    (the message alone for the expected kinds, the exception's type too otherwise) and the worker serves on."""
    from pipeline.models import ModelNotFoundError
    from store import StoreError

    try:
        if not queue.progress(store, job, 0, 1):
            queue.finish(store, job, error="cancelled before it started", cancelled=True)
            return
        work()
    except (ModelNotFoundError, FileNotFoundError, ValueError, StoreError, *expected) as exc:
        queue.finish(store, job, error=str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the worker keeps serving
        queue.finish(store, job, error=f"{type(exc).__name__}: {exc}")
        return
    queue.progress(store, job, 1, 1)
    queue.finish(store, job, run_id=job.request["run_id"])


def serve(store: Path, once: bool = False, poll_s: float = 0.5, device: str | None = None) -> int:
    """Serve the queue until interrupted (or, with once, until it is empty)."""
    from pipeline.models import best_device

    lock_path = queue.queue_path(store).with_name("worker.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(lock_path, "w")  # noqa: SIM115 - held for the life of the worker
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"stepx worker: another worker already serves {store}", file=sys.stderr)
        return 1
    device = device or best_device()
    models: dict = {}
    recovered = queue.recover(store, force=True)  # we hold the lock: no other worker runs these
    if recovered:
        print(f"stepx worker: recovered jobs {recovered} left by a stopped worker", file=sys.stderr, flush=True)
    print(f"stepx worker: serving {store} on {device}", file=sys.stderr, flush=True)
    current: dict = {}
    last_recover = time.time()
    with heartbeat(store, device, current):
        while True:
            try:
                if time.time() - last_recover > queue.HEARTBEAT_STALE_S / 2:  # jobs of workers elsewhere
                    queue.recover(store)
                    last_recover = time.time()
                job = queue.claim(store)
            except sqlite3.Error as exc:
                print(f"stepx worker: cannot read the queue: {exc}", file=sys.stderr, flush=True)
                if once:
                    return 1
                time.sleep(max(poll_s, 1.0))
                continue
            if job is None:
                if once:
                    return 0
                time.sleep(poll_s)
                continue
            print(f"stepx worker: job {job.job_id} (attempt {job.attempts})", file=sys.stderr, flush=True)
            current["job"] = job
            try:
                if os.environ.get("STEPX_RAY_ADDRESS"):  # on a Ray cluster (jobs.ray_jobs), same queue semantics
                    from jobs.ray_jobs import run_job_on_ray

                    run_job_on_ray(store, job, models, device, runner=run_job)
                else:
                    run_job(store, job, models, device)
            finally:
                current["job"] = None
