"""Batch generation on a Ray cluster: one model-holding actor per GPU (or per CPU slot), items fanned out.

    stepx batch prompts.txt --seeds 0-9 --store s3://lab/stepx --ray ray://head:10001

Each actor loads the model once and runs items one at a time (jobs.batch.run_item), so a model is never
loaded per item. An actor that dies (its worker killed, its machine gone) is restarted once by Ray and its
running item retried there (`max_restarts`, `max_task_retries`); an item that raised is tried once more on
any actor. Either way the retried item writes the same run id, so the store ends with one run per item.
Without an address a local cluster is started, bound to 127.0.0.1.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jobs.batch
from jobs.batch import RETRIES, BatchItem, Target, run_item

FORWARDED_ENV = ("AWS_", "STEPX_", "HF_", "OMP_NUM_THREADS", "TRANSFORMERS_")  # what workers need from the driver
CRASH_ONCE_ENV = "STEPX_BATCH_CRASH_ONCE"  # test seam: a path; the first worker to claim it dies mid-run


class BatchActor:
    """Holds one loaded model and runs batch items with it."""

    def __init__(self, store: str | None, model_name: str, device: str | None) -> None:
        import ray
        import torch

        from pipeline.models import load_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        # After a restart, Ray runs the item the dead worker was running first: that item is a retry.
        self.retrying = ray.get_runtime_context().was_current_actor_reconstructed
        self.model = load_model(model_name, device=device) if device else load_model(model_name)
        self.target = Target(store)

    def run(self, item: BatchItem) -> dict:
        if os.environ.get(CRASH_ONCE_ENV):
            jobs.batch.BEFORE_COMMIT = _crash_once
        retry, self.retrying = self.retrying, False
        return {**run_item(self.model, item, self.target), "pid": os.getpid(), "retry": retry}


def _crash_once(run_id: str) -> None:
    """Kill this worker process the first time any worker gets here (its files uploaded, nothing committed)."""
    try:
        os.close(os.open(os.environ[CRASH_ONCE_ENV], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)  # dies in the middle of an item, as a killed machine would


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def connect(address: str | None) -> None:
    """Join the cluster at `address` (or start a local one on 127.0.0.1) unless already connected."""
    if not address:  # a local cluster stays on the loopback (read by ray when first imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": _env()}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=False, num_cpus=os.cpu_count())


def slots() -> tuple[int, dict]:
    """How many model-holding actors the cluster fits, and the resources each takes (a GPU, else a CPU)."""
    import ray

    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        return int(res["GPU"]), {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(res.get("CPU", 1))), {"num_cpus": 1}


def run_ray(
    items: list[BatchItem],
    store: str | None,
    model_name: str,
    address: str | None = None,
    workers: int | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run the items over `workers` actors (default: one per GPU or CPU slot); one result row per item."""
    import ray

    connect(address)
    fits, resources = slots()
    n = max(1, min(workers or fits, len(items)))
    device = "cuda" if "num_gpus" in resources else None
    actor_cls = ray.remote(max_restarts=1, max_task_retries=1, **resources)(BatchActor)
    actors = [actor_cls.remote(store, model_name, device) for _ in range(n)]
    pending = list(enumerate(items))[::-1]
    tries = dict.fromkeys(range(len(items)), 0)
    running: dict[object, tuple[int, object]] = {}
    results: dict[int, dict] = {}
    idle = list(actors)
    while pending or running:
        while idle and pending:
            i, item = pending.pop()
            actor = idle.pop()
            tries[i] += 1
            running[actor.run.remote(item)] = (i, actor)
        done, _ = ray.wait(list(running), num_returns=1)
        ref = done[0]
        i, actor = running.pop(ref)
        try:
            got = ray.get(ref)
            retry = got.pop("retry", False)
            result = {**got, "attempts": tries[i] + int(retry)}
            idle.append(actor)
        except ray.exceptions.RayActorError as exc:  # the actor is gone for good (restarts used up)
            result = _failed(items[i], exc, tries[i])
        except ray.exceptions.RayTaskError as exc:
            idle.append(actor)
            if tries[i] <= RETRIES:
                pending.append((i, items[i]))
                continue
            result = _failed(items[i], exc.cause if exc.cause else exc, tries[i])
        if not idle and not running and pending:
            idle = [a for a in actors if _alive(a)]
            if not idle:
                for j, it in pending:
                    results[j] = _failed(it, RuntimeError("no live worker left"), tries[j])
                pending = []
        results[i] = result
        if on_result:
            on_result(result)
    for a in actors:
        ray.kill(a)
    return [results[i] for i in range(len(items))]


def _failed(item: BatchItem, exc: BaseException, attempts: int) -> dict:
    return {
        "prompt": item.prompt,
        "seed": item.seed,
        "run_id": None,
        "status": "failed",
        "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300],
        "attempts": attempts,
    }


def _alive(actor: object) -> bool:
    import ray

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=30)
        return True
    except Exception:  # noqa: BLE001 - any failure means the actor can't take work
        return False
