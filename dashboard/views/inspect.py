"""Generate & Inspect: make an image, pick a word, move through the denoising steps, export."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.export import _slug, export_all
from dashboard.generate import generate_panel
from dashboard.render import COLORMAPS, Scale, decode, gif_bytes, overlay, with_colorbar
from dashboard.state import (
    concept_maps,
    depth_models,
    guarded,
    image_bytes,
    store,
    store_path,
    text_share,
    word_map,
)
from dashboard.text import plain
from dashboard.widgets import normalisation, pick_run, prompt_text, scale_of
from dashboard.words import cut_words, is_content
from jobs import queue
from store import GLOBAL, Word

DISPLAY_PX = 512


def word_picker(words: list[Word]) -> str | int:
    """Global first, then the prompt's content words; function words and punctuation behind a toggle.

    Words are stored merged (a multi-piece word is one option); a repeated word is labelled by position.
    """
    asked = st.query_params.get("word")
    if asked and "inspect_word" not in st.session_state:
        match = [w.word_index for w in words if w.word.casefold() == asked.casefold()]
        if match:
            st.session_state["inspect_word"] = match[0]
        else:
            st.warning("The word asked for in the address (below) is not a word of this prompt; showing Global.")
            st.code(asked[:200], language=None)
    hidden = [w for w in words if not is_content(w.word)]
    show_all = bool(hidden) and st.toggle(
        f"Show function words and punctuation ({len(hidden)})",
        key="inspect_all_words",
        help="Words like 'a', 'on', 'the' and commas have maps too, but they rarely say where an object is.",
    )
    chosen = st.session_state.get("inspect_word")
    shown = [w for w in words if show_all or is_content(w.word) or w.word_index == chosen]
    counts: dict[str, int] = {}
    for w in shown:
        counts[w.word.casefold()] = counts.get(w.word.casefold(), 0) + 1
    names = {
        w.word_index: plain(w.word) + ("" if counts[w.word.casefold()] == 1 else f" (word {w.word_index + 1})")
        for w in shown
    }
    options: list[str | int] = [GLOBAL] + [w.word_index for w in shown]
    if chosen not in options:
        st.session_state.pop("inspect_word", None)
    return st.radio(
        "Word",
        options,
        format_func=lambda o: "Global (all words)" if o == GLOBAL else names[o],
        horizontal=True,
        key="inspect_word",
    )


def step_picker(steps: int) -> int | None:
    """A denoising step (0-based), or None for the sum over all steps."""
    all_steps = st.toggle("All steps (aggregate)", value=False, key="inspect_all_steps")
    step = st.slider(
        "Step",
        1,
        steps,
        steps,
        key="inspect_step",
        disabled=all_steps,
        help="Click the slider, then the left and right arrow keys move one step.",
    )
    return None if all_steps else step - 1


def display_controls(levels: list[str], bands: bool = False) -> tuple[float, str, dict, tuple[str, ...] | None]:
    """Overlay alpha, colormap, colour-scale choice, and the resolution levels (a DiT's block bands) to combine."""
    a, b = st.columns(2)
    alpha = a.slider("Overlay alpha", 0.0, 1.0, 0.6, 0.05, key="inspect_alpha")
    cmap = b.selectbox("Colormap", list(COLORMAPS), key="inspect_cmap")
    norm = normalisation("inspect")
    what = "Block bands" if bands else "Resolution levels"
    tip = "Transformer blocks grouped by depth, named by block range." if bands else None
    chosen = st.multiselect(what, levels, default=levels, key="inspect_levels", help=tip)
    if not chosen:
        st.info(f"No {'band' if bands else 'level'} selected: showing all.")
    return alpha, cmap, norm, (tuple(chosen) if chosen and len(chosen) < len(levels) else None)


def word_label(words: list[Word], word: str | int) -> str:
    if word == GLOBAL:
        return "Global"
    w = next(w for w in words if w.word_index == word)
    return w.word + (f" ({w.encoder.upper()})" if w.encoder not in (None, "clip") else "")


def concept_picker(names: list[str]) -> int | None:
    """The map family: cross-attention, or ConceptAttention for a FLUX.1 run generated with concepts (its index)."""
    if not names:
        return None
    tip = "ConceptAttention: concepts ride the text path; maps compare attention outputs, softmax over the concepts."
    family = st.radio(
        "Map family", ["Cross-attention", "ConceptAttention"], horizontal=True, key="inspect_family", help=tip
    )
    if family == "Cross-attention":
        return None
    return st.radio(
        "Concept",
        list(range(len(names))),
        format_func=lambda i: plain(names[i]),
        horizontal=True,
        key="inspect_concept",
    )


def encoder_picker(encoders: list[str]) -> str | None:
    """SD3 attends to CLIP and T5 positions: each word has a map per encoder; pick which (None: one encoder)."""
    if len(encoders) < 2:
        return None
    tip = "SD3's text is 77 CLIP positions, then the T5 positions; each word has a map in both."
    return st.radio("Text encoder", encoders, format_func=str.upper, horizontal=True, key="inspect_encoder", help=tip)


def across_steps_max(root: str, run_id: str, word: str | int, steps: int, levels) -> float:
    """The word's largest value over every step (one colour scale for the whole slider)."""
    return max(float(word_map(root, run_id, word, s, levels).max()) for s in range(steps))


def truncation_notice(run: dict, words: list[Word]) -> None:
    """Say visibly that a long prompt was cut, and show the words the model never saw."""
    if not run.get("prompt_truncated"):
        return
    cut = cut_words(run["prompt"], [w.word for w in words])
    st.warning(
        f"This prompt is longer than the text encoder takes: only its first {len(words)} words were used, "
        "so the words below have no attention maps and did not shape the image."
    )
    st.text(f"Cut: {cut}" if cut else "Cut: (the end of the prompt)")


def probe_label(probe: str, embeddings: dict[str, str | None]) -> str:
    """A probe's name on the page, saying when its words are fitted OVAM tokens rather than encoded text."""
    return probe + (" (optimised token)" if embeddings.get(probe) == "optimised" else "")


def probe_picker(probes: list[str], embeddings: dict[str, str | None]) -> str | None:
    """The stored probe to show instead of the word (None: the word), marked as a probe; nothing when none."""
    if not probes:
        return None
    choice = st.selectbox(
        "Probe: a word not in the prompt (`stepx probe`)",
        ["none", *probes],
        key="inspect_probe",
        format_func=lambda p: p if p == "none" else probe_label(p, embeddings),
    )
    return None if choice == "none" else choice


def probe_box(root: str, run_id: str) -> None:
    """A text box that queues `stepx probe` for this run; the worker re-runs it and the picker then lists it."""
    with st.form("probe_form", clear_on_submit=True, border=False):
        text = st.text_input(
            "Probe words not in the prompt (comma-separated)", key="probe_words", placeholder="dog, sky"
        )
        if st.form_submit_button("Queue probe"):
            try:
                job_id = queue.submit(Path(root), {"kind": "probe", "run_id": run_id, "words": queue.probe_words(text)})
            except queue.JobError as exc:
                st.error(f"Probe not queued: {plain(str(exc))}")
            else:
                st.success(f"Probe queued as job {job_id}: the worker re-runs this run exactly; then pick it above.")


def provenance_lines(run: dict) -> list[str]:
    """How a run was made (schema 1.5 provenance), one line per fact that applies; [] for older runs."""
    if not run.get("pipeline_class"):
        return []
    how = "recorded with stepx.record" if run.get("source") == "record" else "stepx generate"
    lines = [f"Pipeline: {run['pipeline_class']} ({how}) · scheduler {run['scheduler']}"]
    if run.get("lora_adapters"):
        pairs = zip(run["lora_adapters"], run.get("lora_scales") or [], strict=False)
        lines.append("LoRA: " + ", ".join(f"{name} x{scale:g}" for name, scale in pairs))
    if run.get("controlnet"):
        lines.append(f"ControlNet: {run['controlnet']}")
    if run.get("strength") is not None:
        lines.append(f"img2img strength {run['strength']:g} · init image sha256 {run.get('init_image_sha256') or '-'}")
    return lines


def provenance_panel(run: dict) -> None:
    """An expander with the run's provenance and its scheduler config, when the run has them."""
    lines = provenance_lines(run)
    if not lines:
        return
    with st.expander("How this run was made"):
        st.text("\n".join(lines))
        st.code(run.get("scheduler_config") or "", language="json")


def body() -> None:
    st.title("Generate & Inspect")
    s = store()
    root = store_path()
    runs = s.runs()
    generate_panel(expanded=not runs)
    if not runs:
        st.info("No runs yet: generate one above, or build the curated gallery with `make demo`.")
        return
    run_id = pick_run(runs, "inspect_run_select")
    run = s.run(run_id)
    words = s.words(run_id)
    prompt_text(run["prompt"])
    st.text(
        f"{run['model_name']} · seed {run['seed']} · {run['steps']} steps · guidance {run['guidance']:g} · "
        f"{run['width']}x{run['height']} px · {run['scheduler']} · run {run_id}"
    )
    truncation_notice(run, words)
    provenance_panel(run)
    if not words:
        st.warning("This prompt has no words to inspect.")
        return
    left, right = st.columns([3, 2])
    dit = run.get("architecture") in ("sd3", "flux")
    with right:
        st.subheader("Attention Controls")
        concept_names = concept_maps(root, run_id, None)[0] if run.get("architecture") == "flux" else []
        concept = concept_picker(concept_names)
        encoder = encoder_picker(s.encoders(run_id)) if dit and concept is None else None
        if encoder is not None:
            words = [w for w in words if w.encoder == encoder]
        tip = "Per pixel, the part of its attention (image and text keys) that goes to any text position."
        share = (
            dit
            and concept is None
            and st.toggle(
                "Text share: how much each pixel listens to the prompt at all", key="inspect_text_share", help=tip
            )
        )
        word = GLOBAL if share else word_picker(words)
        embeddings = {} if dit else s.probe_embeddings(run_id)
        probe = None if dit else probe_picker(s.probes(run_id), embeddings)
        if not dit:
            probe_box(root, run_id)
        step = step_picker(run["steps"])
        alpha, cmap, norm, levels = display_controls(list(run["levels"]), bands=dit)
    across = None  # every step is read only when that scale is asked for (a slider rerun reads one map)
    wanted_across = step is not None and norm["mode"] == "one scale across steps"
    if share:
        heat = text_share(root, run_id, step, levels)
        if wanted_across:
            across = max(float(text_share(root, run_id, t, levels).max()) for t in range(run["steps"]))
    else:
        heat = word_map(root, run_id, word, step, levels)
        if wanted_across:
            across = across_steps_max(root, run_id, word, run["steps"], levels)
    if concept is not None:  # ConceptAttention: its own table, no bands
        heat = concept_maps(root, run_id, step)[1][concept]
        if wanted_across:
            across = max(float(concept_maps(root, run_id, t)[1][concept].max()) for t in range(run["steps"]))
    if probe is not None:  # a word not in the prompt, stored beside the run by `stepx probe`
        heat = s.probe_map(run_id, probe, step=step)
        if wanted_across:
            across = max(float(s.probe_map(run_id, probe, step=t).max()) for t in range(run["steps"]))
    scale = scale_of(heat, norm, across)
    base = decode(image_bytes(root, run_id, step))
    size = (DISPLAY_PX, round(DISPLAY_PX * run["height"] / run["width"]))
    label = "Text share" if share else f"probe: {probe_label(probe, embeddings)}" if probe else word_label(words, word)
    if concept is not None:
        label = f"{concept_names[concept]} (ConceptAttention)"
    over = "all steps (mean)" if share or concept is not None else "all steps (sum)"
    where = over if step is None else f"step {step + 1} of {run['steps']}"
    with left:
        st.image(
            with_colorbar(overlay(base, heat, alpha, cmap, size=size, scale=scale), cmap, scale),
            caption=f"{plain(label)} · {where}",
            width="stretch",
        )
        st.caption(
            f"Raw values: min {heat.min():.4g}, max {heat.max():.4g} (attention probability per latent pixel, "
            f"{'levels ' + plain(', '.join(levels)) if levels else 'all levels'} averaged"
            f"{', summed over steps' if step is None else ''}); colours {norm['mode']}: "
            f"{scale.lo:.4g} to {scale.hi:.4g}."
        )
        with st.expander("Final image"):
            st.image(image_bytes(root, run_id, None), width=min(DISPLAY_PX, run["width"] * 4))
        depth_panel(run_id, run, alpha, cmap, size)
    with right:
        downloads(run_id, run, word, word_label(words, word) if probe else label, levels, alpha, cmap, size)


def depth_panel(run_id: str, run: dict, alpha: float, cmap: str, size: tuple[int, int]) -> None:
    """The optional depth companion: near/far structure of the final image, beside the attention."""
    panel = st.expander("Depth companion (scene structure, not attention)", key="depth_panel", on_change="rerun")
    with panel:
        if not panel.open:  # the model list (a subprocess) is asked for only once the panel is opened
            return
        st.caption(
            "A separate depth estimate of the final image, to compare what the model attended to with what is "
            "near and far. It is not an attention map."
        )
        found = store().depth(run_id)
        if found is not None:
            depth, info = found
            near_is_high = info["kind"] == "relative"
            shown = depth if near_is_high else depth.max() - depth  # bright = near in both cases
            base = decode(image_bytes(store_path(), run_id, None))
            dscale = Scale(0.0, float(shown.max() - shown.min()))
            st.image(
                with_colorbar(
                    overlay(base, shown - shown.min(), alpha, cmap, size=size, scale=dscale),
                    cmap,
                    dscale,
                    "depth (relative to the nearest point)",
                ),
                width="stretch",
                caption=f"{plain(info['model_id'])} · {info['kind']} depth {info['min_value']:.3g} to "
                f"{info['max_value']:.3g} · bright = near",
            )
            return
        entries = {m["name"]: m for m in depth_models()}
        zoe = entries.get("zoedepth")
        if zoe is None or not zoe["present"]:
            st.info(
                "No depth estimate for this run, and the depth model's weights are not on this machine: "
                + (zoe["where"] if zoe else "run `stepx models` to see where StepX looks.")
            )
            return
        if st.button("Estimate depth (ZoeDepth)", key="depth_go"):
            job_id = queue.submit(
                Path(store_path()),
                {"kind": "depth", "run_id": run_id, "depth_model": "zoedepth", "prompt": f"depth of {run_id}"},
            )
            st.session_state.setdefault("my_jobs", []).append(job_id)
            st.info("Queued: the worker will add the depth map to this run.")


def downloads(run_id: str, run: dict, word: str | int, label: str, levels, alpha: float, cmap: str, size) -> None:
    """GIF of the word over the steps and the Export All ZIP, each built only when asked."""
    root = store_path()
    st.subheader("Export")
    key = (run_id, word, levels, alpha, cmap)
    if st.button("GIF Animation", key="make_gif", help="The selected word over every step"):
        maps = [word_map(root, run_id, word, s, levels) for s in range(run["steps"])]
        scale = Scale(0.0, max(float(m.max()) for m in maps))
        frames = [
            with_colorbar(
                overlay(decode(image_bytes(root, run_id, s)), m, alpha, cmap, size=size, scale=scale), cmap, scale
            )
            for s, m in enumerate(maps)
        ]
        st.session_state["gif"] = (key, gif_bytes(frames))
    gif = st.session_state.get("gif")
    if gif and gif[0] == key:
        st.image(gif[1], caption=f"{plain(label)} over {run['steps']} steps (one colour scale)")
        st.download_button("Download GIF", gif[1], f"stepx-{run_id}-{_slug(label)}.gif", "image/gif", key="dl_gif")
    everything = "Every token x step map at display size (colour and overlay PNGs), raw .npy arrays, CSV, GIFs"
    if st.button("Export All", key="make_zip", help=everything):
        with st.spinner("Building the ZIP..."):
            st.session_state["zip"] = (run_id, export_all(store(), run_id, cmap, alpha, size))
    zipped = st.session_state.get("zip")
    if zipped and zipped[0] == run_id:
        st.download_button(
            "Download ZIP", zipped[1], f"stepx-{run_id}.zip", "application/zip", key="dl_zip", type="primary"
        )


guarded(body)
