"""Gallery: every run as a thumbnail, filtered by tag, model and prompt text."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import streamlit as st

from dashboard.state import guarded, image_bytes, select_run, store, store_path
from dashboard.text import plain
from dashboard.widgets import prompt_text
from schema.layout import gallery_progress_path

PER_PAGE = 24
COLUMNS = 4
SHOW_FINISHED_S = 120.0  # a finished build's summary stays this long
STALLED_S = 900.0  # no progress for this long: the build stopped (one run takes well under a minute)


def build_progress(root: str) -> dict | None:
    """The gallery build's progress file (None when there is none or it can't be read)."""
    path = gallery_progress_path(Path(root))
    if not path.is_file():  # also never a FIFO, whose read would block the page
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not _number(data.get("total"), int):
        return None  # written by hand or half-damaged: no progress shown rather than a traceback
    if not all(data.get(k) is None or _number(data[k]) for k in ("done", "finished_at", "updated_at")):
        return None
    total = max(1, data["total"])
    return {**data, "total": total, "done": min(max(0, int(data.get("done") or 0)), total)}  # a progress bar's range


def _number(value: object, kind: type | tuple = (int, float)) -> bool:
    """Whether a progress field is a finite number of the kind (JSON true/false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    return isinstance(value, int) or math.isfinite(value)


@st.fragment(run_every=2.0)
def build_status(shown: int) -> None:
    """Progress of a gallery build running behind the dashboard; new runs appear as they finish."""
    root = store_path()
    prog = build_progress(root)
    if prog is None:
        return
    now, total, done = time.time(), max(1, prog["total"]), int(prog.get("done") or 0)
    finished = prog.get("finished_at")
    name = plain(str(prog.get("gallery", "gallery")))
    if prog.get("error"):
        st.error(f"The {name} gallery build stopped after {done} of {total} runs.")
        st.text(str(prog["error"]))
    elif finished:
        if now - finished < SHOW_FINISHED_S:
            st.success(f"The {name} gallery is built: {done} of {total} runs.")
    elif now - float(prog.get("updated_at") or 0) > STALLED_S:
        st.warning(f"The {name} gallery build stopped at {done} of {total} runs; `make demo` resumes it.")
    else:
        st.progress(
            done / total,
            text=f"Building the {name} gallery: {done} of {total} runs "
            f"({plain(str(prog.get('model', '')))}); runs appear here as they finish.",
        )
        if prog.get("current"):
            st.text(f"Now: {prog['current']}")
    if len(store().runs()) != shown:
        st.rerun(scope="app")


def filters(tags: list[str], models: list[str]) -> tuple[str | None, str | None, str]:
    """Tag, model and text filters; None means any."""
    a, b, c = st.columns([1, 1, 2])
    tag = a.selectbox("Tag", ["any"] + tags, key="gallery_tag")
    model = b.selectbox("Model", ["any"] + models, key="gallery_model")
    text = c.text_input("Search prompts", key="gallery_text", placeholder="e.g. circle")
    return (None if tag == "any" else tag), (None if model == "any" else model), text.strip()


def body() -> None:
    st.title("Gallery")
    s = store()
    everything = s.runs()
    build_status(len(everything))
    if not everything:
        st.info(
            "This store has no runs yet. Build the curated gallery with `make demo` (or "
            "`stepx gallery build`), or generate one on **Generate & Inspect**."
        )
        return
    tags = sorted({t for r in everything for t in (r["tags"] or [])})
    models = sorted({r["model_name"] for r in everything})
    tag, model, text = filters(tags, models)
    runs = s.runs(text=text or None, tag=tag, model=model)
    st.caption(f"{len(runs)} of {len(everything)} runs")
    if not runs:
        st.warning("No run matches these filters.")
        return
    pages = max(1, -(-len(runs) // PER_PAGE))
    page = st.number_input("Page", 1, pages, 1, key="gallery_page") if pages > 1 else 1
    shown = runs[(page - 1) * PER_PAGE : page * PER_PAGE]
    root = store_path()
    for i in range(0, len(shown), COLUMNS):
        for col, run in zip(st.columns(COLUMNS), shown[i : i + COLUMNS], strict=False):
            with col, st.container(border=True):
                try:
                    st.image(image_bytes(root, run["run_id"], None), width="stretch")
                except Exception:  # noqa: BLE001 - a broken run shows as such, the grid goes on
                    st.warning("image missing")
                prompt_text(run["prompt"])
                st.caption(f"{plain(run['model_name'])} · seed {run['seed']} · {run['steps']} steps")
                if st.button("Inspect", key=f"open_{run['run_id']}", width="stretch"):
                    select_run(run["run_id"])
                    st.switch_page("views/inspect.py")
    bad = s.bad_runs()
    if bad:
        with st.expander(f"{len(bad)} unreadable runs"):
            for run_id, why in bad.items():
                st.text(f"{run_id}: {why}")


guarded(body)
