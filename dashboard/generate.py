"""The Generate panel: requests go into the store's job queue; `stepx worker` (started by
`make demo`) runs them and the panel follows their progress. Torch stays out of the dashboard."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import streamlit as st

from dashboard.state import generators, select_run, store_path
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
        st.error(str(exc), icon=":material/block:")
        return None
    return GenerateRequest(prompt, negative, model, int(seed), int(steps), float(guidance), int(size), int(size))


@st.fragment(run_every=1.0)
def job_status() -> None:
    """This session's jobs: queued, running (with the step), done (opens the run) or failed."""
    mine = st.session_state.get("my_jobs", [])
    if not mine:
        return
    store = Path(store_path())
    if queue.live_worker(store) is None:
        st.warning("No worker is running, so jobs wait in the queue: start one with `stepx worker` "
                   "(`make demo` starts one).")  # fmt: skip
    for job_id in reversed(mine[-5:]):
        job = queue.get(store, job_id)
        if job is None:
            continue
        label = f"Job {job.job_id}: {job.request['prompt'][:60]}"
        if job.status == "queued":
            st.caption(f"{label} · queued")
        elif job.status == "running":
            total = job.total_steps or 1
            st.progress(min(1.0, job.step / total), text=f"{label} · step {job.step} of {total}")
        elif job.status == "failed":
            st.error(f"{label} · failed: {job.error}")
        elif job.status == "done":
            st.caption(f"{label} · done")
            if job.request.get("kind") == "depth":
                continue
            opened = st.session_state.setdefault("opened_jobs", [])
            if job.job_id not in opened:
                opened.append(job.job_id)
                select_run(job.run_id)
                st.rerun(scope="app")


def generate_panel(expanded: bool = False) -> None:
    """Generate a new image through the queue and follow it."""
    with st.expander("Generate a new image", expanded=expanded):
        req = request_form()
        if req is not None:
            submit(req)
        job_status()
