"""Gallery: every run as a thumbnail, filtered by tag, model and prompt text."""

from __future__ import annotations

import streamlit as st

from dashboard.state import guarded, image_bytes, select_run, store, store_path

PER_PAGE = 24
COLUMNS = 4


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
                st.markdown(f"**{run['prompt']}**")
                st.caption(f"{run['model_name']} · seed {run['seed']} · {run['steps']} steps")
                if st.button("Inspect", key=f"open_{run['run_id']}", width="stretch"):
                    select_run(run["run_id"])
                    st.switch_page("views/inspect.py")
    bad = s.bad_runs()
    if bad:
        with st.expander(f"{len(bad)} unreadable runs"):
            for run_id, why in bad.items():
                st.write(f"`{run_id}`: {why}")


guarded(body)
