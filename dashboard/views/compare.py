"""Compare: 2-4 runs side by side on the same word, step and colour scale, with curves and a table."""

from __future__ import annotations

import html

import plotly.express as px
import streamlit as st

from analysis.compare import has_word, related_runs, word_curves, word_table
from dashboard.render import Scale, decode, difference_image, overlay, with_colorbar
from dashboard.state import guarded, image_bytes, store, store_path, word_map
from dashboard.text import plain
from dashboard.widgets import look, normalisation, prompt_text, scale_of
from store import GLOBAL

TILE_PX = 320


def choose_runs(runs: list[dict]) -> list[str]:
    """2-4 runs: picked by hand, or the current run plus related ones."""
    labels = {r["run_id"]: " ".join(f"{r['prompt'][:60]} · {r['model_name']} · seed {r['seed']}".split()) for r in runs}
    ids = list(labels)
    if "compare_runs" not in st.session_state:
        first = st.session_state.get("run_id") if st.session_state.get("run_id") in labels else ids[0]
        st.session_state["compare_runs"] = [first] + [i for i in ids if i != first][:1]
    a, b = st.columns(2)
    anchor = st.session_state["compare_runs"][0] if st.session_state["compare_runs"] else ids[0]
    if a.button("Same prompt, other seeds", key="compare_same_prompt"):
        st.session_state["compare_runs"] = [anchor] + related_runs(store(), anchor, "same prompt")[:3]
    if b.button("Same seed, edited prompts", key="compare_same_seed"):
        st.session_state["compare_runs"] = [anchor] + related_runs(store(), anchor, "same seed")[:3]
    chosen = st.multiselect("Runs (2-4)", ids, format_func=labels.get, max_selections=4, key="compare_runs")
    return chosen


def body() -> None:
    st.title("Compare")
    s = store()
    runs = s.runs()
    if len(runs) < 2:
        st.info("Compare needs at least two runs in the store.")
        return
    chosen = choose_runs(runs)
    if len(chosen) < 2:
        st.info("Pick at least two runs (the buttons find runs related to the first one).")
        return
    words = sorted({w.word for rid in chosen for w in s.words(rid)}, key=str.casefold)
    a, b = st.columns(2)
    word = a.selectbox("Word (matched by text)", [GLOBAL] + words, key="compare_word")
    min_steps = min(s.run(r)["steps"] for r in chosen)
    all_steps = b.toggle("All steps (aggregate)", key="compare_all_steps")
    step = None if all_steps else st.slider("Step (synced)", 1, min_steps, min_steps, key="compare_step") - 1
    alpha, cmap = look("compare")
    norm = normalisation("compare", with_across=False)
    root = store_path()
    maps = {r: word_map(root, r, word, step, None) for r in chosen if has_word(s, r, word)}
    vmax = max((float(m.max()) for m in maps.values()), default=0.0)
    # One scale for all runs: the largest of the runs' scales (fixed range as typed).
    scales = [scale_of(m, norm) for m in maps.values()]
    scale = Scale(min((sc.lo for sc in scales), default=0.0), max((sc.hi for sc in scales), default=0.0))
    st.caption(
        f"One colour scale for all runs ({norm['mode']}): {scale.lo:.4g} to {scale.hi:.4g} "
        f"(attention probability); largest value {vmax:.4g}"
    )
    for col, rid in zip(st.columns(len(chosen)), chosen, strict=True):
        run = s.run(rid)
        with col:
            prompt_text(run["prompt"])
            st.caption(f"seed {run['seed']} · {plain(run['model_name'])}")
            if rid not in maps:
                st.info(f"'{plain(word)}' is not in this prompt (missing).")
                st.image(image_bytes(root, rid, None), width=TILE_PX)
                continue
            base = decode(image_bytes(root, rid, step))
            size = (TILE_PX, round(TILE_PX * run["height"] / run["width"]))
            st.image(
                with_colorbar(overlay(base, maps[rid], alpha, cmap, size=size, scale=scale), cmap, scale),
                caption=f"{plain(word)} · max {maps[rid].max():.4g}",
                width="stretch",
            )
    present = [r for r in chosen if r in maps]
    if len(present) == 2 and maps[present[0]].shape == maps[present[1]].shape:
        img, limit = difference_image(maps[present[0]], maps[present[1]], (TILE_PX, TILE_PX))
        st.image(img, caption=f"Difference, first minus second (red = more in the first), limit ±{limit:.4g}")
    curves = word_curves(s, chosen, word)
    if curves:
        # plotly reads HTML tags in legend text: escape the prompt
        labels = {r: html.escape(f"{s.run(r)['prompt'][:40]} (seed {s.run(r)['seed']})") for r in chosen}
        for row in curves:
            row["run"] = labels[row["run_id"]]
            row["step"] = row["step_index"] + 1
        tabs = st.tabs(["mass", "peak", "centroid x", "centroid y"])
        for tab, metric in zip(tabs, ["mass", "peak", "centroid_x", "centroid_y"], strict=True):
            with tab:
                st.plotly_chart(px.line(curves, x="step", y=metric, color="run", markers=True), width="stretch")
    missing = [r for r in chosen if r not in maps]
    if missing:
        st.caption(f"'{plain(word)}' is missing in {len(missing)} run(s); their curves are absent.")
    st.subheader("Per-word statistics over all steps")
    st.dataframe(word_table(s, chosen), hide_index=True)


guarded(body)
