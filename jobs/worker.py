"""`stepx worker`: run queued generation jobs one at a time on the best device.

    stepx worker [--store DIR] [--once] [--poll 0.5]

Each job's trace is written atomically, so a worker killed mid-job leaves no visible run; on
restart the job is requeued once (then failed). A file lock keeps one worker per store.
"""

from __future__ import annotations

import fcntl
import sys
import time
from pathlib import Path

from jobs import queue


def run_job(store: Path, job: queue.Job, models: dict, device: str | None) -> None:
    """Generate one job's request and record the outcome."""
    from pipeline.generate import GenerationConfig, GenerationError, generate_trace
    from pipeline.models import ModelNotFoundError, load_model
    from pipeline.trace_writer import write_trace

    req = job.request
    if req.get("kind") == "depth":
        run_depth_job(store, job)
        return
    try:
        name = req.get("model")
        if name not in models:
            models.clear()  # one model in memory at a time
            models[name] = load_model(name, device=device)
        model = models[name]
        config = GenerationConfig(
            prompt=req["prompt"], negative_prompt=req.get("negative", ""), seed=int(req.get("seed", 0)),
            steps=req.get("steps"), guidance=req.get("guidance"), width=req.get("width"), height=req.get("height"),
            tags=list(req.get("tags", [])),
        )  # fmt: skip

        def on_step(step: int, total: int) -> None:
            queue.progress(store, job.job_id, step, total)

        trace = generate_trace(model, config, on_step=on_step)
        run_id = write_trace(store, trace).run_id
    except (GenerationError, ModelNotFoundError, ValueError) as exc:
        queue.finish(store, job.job_id, error=str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the worker keeps serving; the job records why it failed
        queue.finish(store, job.job_id, error=f"{type(exc).__name__}: {exc}")
        return
    queue.finish(store, job.job_id, run_id=run_id)


def run_depth_job(store: Path, job: queue.Job) -> None:
    """Estimate depth for an existing run."""
    from jobs.depth import depth_for_run
    from pipeline.depth import load_depth_model
    from pipeline.models import ModelNotFoundError

    req = job.request
    try:
        queue.progress(store, job.job_id, 0, 1)
        depth_for_run(store, req["run_id"], load_depth_model(req.get("depth_model", "zoedepth")))
    except (ModelNotFoundError, FileNotFoundError, ValueError) as exc:
        queue.finish(store, job.job_id, error=str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the worker keeps serving
        queue.finish(store, job.job_id, error=f"{type(exc).__name__}: {exc}")
        return
    queue.progress(store, job.job_id, 1, 1)
    queue.finish(store, job.job_id, run_id=req["run_id"])


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
    print(f"stepx worker: serving {store} on {device}", file=sys.stderr, flush=True)
    last_beat = 0.0
    while True:
        if time.time() - last_beat > 5:
            queue.worker_beat(store, device)
            queue.recover(store)
            last_beat = time.time()
        job = queue.claim(store)
        if job is None:
            if once:
                return 0
            time.sleep(poll_s)
            continue
        print(f"stepx worker: job {job.job_id} (attempt {job.attempts})", file=sys.stderr, flush=True)
        run_job(store, job, models, device)
