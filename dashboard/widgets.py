"""Widget groups shared by pages; each returns plain values."""

from __future__ import annotations

import streamlit as st

from dashboard.render import COLORMAPS
from dashboard.state import select_run


def pick_run(runs: list[dict], key: str) -> str:
    """The run to show: the one chosen on another page, the URL's, or the newest."""
    ids = [r["run_id"] for r in runs]
    wanted = st.session_state.get("run_id") or st.query_params.get("run")
    if wanted and wanted not in ids:
        st.warning(f"Run {wanted} is not in this store; showing the newest run instead.")
        wanted = None
    labels = {r["run_id"]: f"{r['prompt'][:70]} · {r['model_name']} · seed {r['seed']}" for r in runs}
    choice = st.selectbox("Run", ids, index=ids.index(wanted) if wanted else 0, format_func=labels.get, key=key)
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
