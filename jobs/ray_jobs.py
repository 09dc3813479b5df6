"""The dashboard's on-demand jobs on a Ray cluster: `STEPX_RAY_ADDRESS=ray://head:10001 stepx worker`.

The worker still claims jobs from the store's queue (one worker per store, its heartbeat and recovery
unchanged) but runs each on a model-holding Ray actor, which calls the same `jobs.worker.run_job`: step
progress, cancel (checked at every step) and failures are written to the queue exactly as by the local
worker. The actor opens the queue and the store by path, so its node must see the store folder (the same
machine, or a shared file system); `local` starts a local cluster on 127.0.0.1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from jobs import queue

ENV = "STEPX_RAY_ADDRESS"


def ray_address() -> str | None:
    """The cluster to run jobs on ($STEPX_RAY_ADDRESS; 'local' for a local one), or None for in-process jobs."""
    return os.environ.get(ENV) or None


class JobActor:
    """Holds the models of the jobs it ran (one at a time, like the local worker) and runs queue jobs."""

    def __init__(self, device: str | None, runner: Callable) -> None:
        self.models: dict = {}
        self.device = device
        self.runner = runner  # the worker's own run_job, passed in so this module never imports the worker

    def run(self, store: str, job: queue.Job) -> int:
        self.runner(Path(store), job, self.models, self.device)
        return os.getpid()


_ACTOR: list = []


def run_job_on_ray(store: Path, job: queue.Job, models: dict, device: str | None, runner: Callable) -> None:
    """Run one claimed job on the cluster's job actor (started on first use) and wait for it to end."""
    import ray

    from jobs.ray_batch import connect

    address = ray_address()
    connect(None if address == "local" else address)
    if not _ACTOR:
        resources = {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}
        actor_device = device if resources.get("num_gpus") else None
        _ACTOR.append(ray.remote(max_restarts=1, **resources)(JobActor).remote(actor_device, runner))
    try:
        ray.get(_ACTOR[0].run.remote(str(store), job))
    except ray.exceptions.RayError as exc:  # the actor died: the job fails with the reason, the worker goes on
        queue.finish(store, job, error=f"the Ray worker stopped: {type(exc).__name__}")
