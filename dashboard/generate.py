"""The Generate panel: requests go into the store's job queue; `stepx worker` (started by
`make demo`) runs them and the panel follows their progress. Torch stays out of the dashboard."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import streamlit as st

from dashboard.state import generators, select_run, store_path
from dashboard.text import plain
from jobs import queue
from schema import limits


@dataclass
class GenerateRequest:
    """What the Generate button asks for (the job's JSON)."""

    prompt: str
    negative: str
    model: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int


def default_model(entries: list[dict]) -> tuple[str, str]:
    """SD 1.5 when present, else the embedded model, else tiny-random; with a one-line reason."""
    present = {e["name"]: e for e in entries if e["present"]}
    if "sd15" in present:
        return "sd15", "Stable Diffusion 1.5 weights found locally."
    if "shapes" in present:
        return "shapes", "SD 1.5 weights are not on this machine, so the embedded shapes model is preselected."
    return "tiny-random", "No trained model is present; tiny-random draws noise (use it to try the tools)."


def submit(req: GenerateRequest) -> int:
    """Queue a request; remember it for this browser session."""
    job_id = queue.submit(Path(store_path()), asdict(req))
    st.session_state.setdefault("my_jobs", []).append(job_id)
    return job_id


def request_form() -> GenerateRequest | None:
    """Prompt box, model picker and settings; the request when Generate is pressed."""
    entries = generators()
    if not entries:
        st.error("Could not list the models (is the pipeline installed? run `make setup`).")
        return None
    by_name = {e["name"]: e for e in entries}
    preselect, reason = default_model(entries)
    prompt = st.text_area("Prompt", "a red circle on the left and a blue square on the right", key="gen_prompt")
    negative = st.text_input("Negative prompt", "", key="gen_negative")
    names = list(by_name)
    model = st.selectbox(
        "Model",
        names,
        index=names.index(preselect),
        format_func=lambda n: by_name[n]["title"] + ("" if by_name[n]["present"] else " (weights absent)"),
        key="gen_model",
    )
    st.caption(reason if model == preselect else by_name[model]["where"])
    spec = by_name[model]
    c1, c2, c3, c4 = st.columns(4)
    lim = {name: limits.limit_for(name, model) for name in ("seed", "steps", "guidance", "width")}
    seed = c1.number_input("Seed", lim["seed"].min, lim["seed"].max, 0, key="gen_seed")
    steps = c2.number_input("Steps", lim["steps"].min, lim["steps"].max, int(spec["steps"]), key=f"gen_steps_{model}")
    guidance = c3.number_input(
        "Guidance",
        float(lim["guidance"].min),
        float(lim["guidance"].max),
        float(spec["guidance"]),
        0.5,
        key=f"gen_guidance_{model}",
    )
    size = c4.number_input(
        "Size (px)",
        lim["width"].min,
        lim["width"].max,
        int(spec["size"]),
        limits.SIZE_MULTIPLE,
        key=f"gen_size_{model}",
        help=f"{lim['width'].min} to {lim['width'].max} px for this model",
    )
    if not st.button("Generate", type="primary", disabled=not spec["present"], key="gen_go"):
        return None
    try:  # the same table the CLI and the queue check
        limits.check_prompt(prompt, negative)
        limits.check_generation(model, int(steps), int(size), int(size), int(seed), float(guidance))
    except limits.LimitError as exc:
        st.error(plain(str(exc)), icon=":material/block:")
        return None
    return GenerateRequest(prompt, negative, model, int(seed), int(steps), float(guidance), int(size), int(size))


def worker_alive(store: Path, jobs: list[queue.Job]) -> bool:
    """A worker beat recently, or a running job's heartbeat is fresh (a long job is not a dead worker)."""
    if queue.live_worker(store) is not None:
        return True
    now = time.time()
    return any(
        j.status in queue.ACTIVE and j.heartbeat_at is not None and now - j.heartbeat_at < queue.HEARTBEAT_STALE_S
        for j in jobs
    )


def elapsed(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    s = max(0, int(seconds or 0))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def cancel(store: Path, job_id: int) -> None:
    """Button callback: cancel a job, keeping the queue's one-line answer when it can't be cancelled."""
    try:
        queue.cancel(store, job_id)
    except queue.JobError as exc:
        st.session_state["cancel_error"] = str(exc)


def cancel_button(store: Path, job: queue.Job) -> None:
    """Cancel a queued or running job (a running one stops at its worker's next step)."""
    st.button(
        "Cancel",
        key=f"cancel_{job.job_id}",
        on_click=cancel,
        args=(store, job.job_id),
        help="Stop this job; a running one stops at its next step",
    )


def job_line(job: queue.Job) -> str:
    """One plain-text line about a job: its prompt, state, queue position and time."""
    prompt = " ".join(str(job.request.get("prompt", "")).split())[:60]
    head = f"Job {job.job_id}: {prompt}"
    if job.status == "queued":
        ahead = (job.position or 1) - 1
        where = "next to run" if ahead == 0 else f"{ahead} job(s) ahead"
        return f"{head} · queued, {where} · waiting {elapsed(job.waited_s())}"
    if job.status == "running":
        return f"{head} · step {job.step} of {job.total_steps or '?'} · running {elapsed(job.elapsed_s())}"
    if job.status == "cancelling":
        return f"{head} · cancelling (stops at the next step) · ran {elapsed(job.elapsed_s())}"
    if job.status == "failed":
        return f"{head} · failed: {job.error}"
    took = job.elapsed_s()
    return f"{head} · {job.status}" + (f" in {elapsed(took)}" if took is not None else "")


@st.fragment(run_every=1.0)
def job_status() -> None:
    """This session's jobs: queued (position, wait), running (step, time), done (opens the run) or failed."""
    mine = st.session_state.get("my_jobs", [])
    if not mine:
        return
    store = Path(store_path())
    jobs = [j for j in (queue.get(store, i) for i in mine[-5:]) if j is not None]
    waiting = [j for j in jobs if j.status == "queued" or j.status in queue.ACTIVE]
    if waiting and not worker_alive(store, jobs):
        st.warning(
            "No worker is running, so jobs wait in the queue: start one with `stepx worker` (`make demo` starts one)."
        )
    if "cancel_error" in st.session_state:
        st.text(st.session_state.pop("cancel_error"))
    for job in reversed(jobs):
        line = job_line(job)
        if job.status == "queued" or job.status in queue.ACTIVE:
            a, b = st.columns([5, 1])
            with a:
                if job.status in queue.ACTIVE:
                    st.progress(min(1.0, job.step / (job.total_steps or 1)))
                st.text(line)
            with b:
                if job.status != "cancelling":
                    cancel_button(store, job)
        elif job.status == "failed":
            st.error("Job failed (details below).")
            st.text(line)
        else:
            st.text(line)
        if job.status == "done" and job.request.get("kind") != "depth" and job.run_id:
            opened = st.session_state.setdefault("opened_jobs", [])
            if job.job_id not in opened:
                opened.append(job.job_id)
                select_run(job.run_id)
                st.rerun(scope="app")


def generate_panel(expanded: bool = False) -> None:
    """Generate a new image through the queue and follow it.

    The panel tracks its open state, so the model list (a subprocess) is asked for only once it is opened.
    """
    panel = st.expander("Generate a new image", expanded=expanded, key="gen_panel", on_change="rerun")
    with panel:
        if panel.open or (panel.open is None and expanded):
            req = request_form()
            if req is not None:
                submit(req)
    job_status()
