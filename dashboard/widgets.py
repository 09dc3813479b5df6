"""Widget groups shared by pages; each returns plain values. User text (prompts, tags, run ids, URL
parameters) is shown with `st.text`/`st.code` or escaped, never as markdown: a stored prompt
`![x](http://host/p.png)` must not make a viewer's browser fetch anything."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard.render import COLORMAPS, NORMALISATIONS, Scale, scale_for
from dashboard.state import select_run


def prompt_text(prompt: str) -> None:
    """A prompt as plain text (never markdown), in the prompt style."""
    st.text(prompt)


def pick_run(runs: list[dict], key: str) -> str:
    """The run to show: the one chosen on another page or by a finished job, the URL's, or the newest.

    The keyed selectbox keeps its own value across reruns, so the session's `run_id` is written into it
    before it is drawn; a choice made in the box goes the other way through its callback.
    """
    ids = [r["run_id"] for r in runs]
    wanted = st.session_state.get("run_id") or st.query_params.get("run")
    if wanted and wanted not in ids:
        st.warning("The run asked for (below) is not in this store; showing the newest run instead.")
        st.code(str(wanted)[:200], language=None)
        wanted = None
    choice_now = wanted or (st.session_state.get(key) if st.session_state.get(key) in ids else ids[0])
    st.session_state[key] = choice_now
    labels = {r["run_id"]: " ".join(f"{r['prompt'][:70]} · {r['model_name']} · seed {r['seed']}".split()) for r in runs}
    choice = st.selectbox(
        "Run", ids, format_func=labels.get, key=key, on_change=lambda: select_run(st.session_state[key])
    )
    if choice != st.session_state.get("run_id"):
        select_run(choice)
    st.query_params["run"] = choice
    return choice


def look(key: str, alpha: float = 0.6) -> tuple[float, str]:
    """Overlay alpha and colormap."""
    a, b = st.columns(2)
    return (
        a.slider("Overlay alpha", 0.0, 1.0, alpha, 0.05, key=f"{key}_alpha"),
        b.selectbox("Colormap", list(COLORMAPS), key=f"{key}_cmap"),
    )


def normalisation(key: str, with_across: bool = True) -> dict:
    """The colour-scale choice: mode plus its range or percentile (arguments for `scale_for`)."""
    modes = [m for m in NORMALISATIONS if with_across or m != "one scale across steps"]
    mode = st.selectbox(
        "Colour scale", modes, key=f"{key}_norm", help="\n\n".join(f"**{m}**: {NORMALISATIONS[m]}" for m in modes)
    )
    out: dict = {"mode": mode}
    if mode == "fixed range":
        a, b = st.columns(2)
        lo = a.number_input("From", value=0.0, format="%.4g", key=f"{key}_lo")
        hi = b.number_input("To", value=0.1, format="%.4g", key=f"{key}_hi")
        out["fixed"] = (float(lo), float(hi))
    elif mode == "percentile clip":
        out["percentile"] = float(st.slider("Percentile", 50.0, 100.0, 99.0, 0.5, key=f"{key}_pct"))
    return out


def scale_of(heat: np.ndarray, choice: dict, across_max: float | None = None) -> Scale:
    """`scale_for` with a `normalisation` choice."""
    kw = {k: v for k, v in choice.items() if k != "mode"}
    return scale_for(heat, choice["mode"], across_max=across_max, **kw)
