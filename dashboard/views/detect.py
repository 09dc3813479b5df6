"""Detect & Annotate: find a word's object from its attention, and turn the prompt's objects into
COCO annotations (TITAN)."""

from __future__ import annotations

import streamlit as st
from PIL import Image, ImageDraw

from analysis.detection import Detection, detect, guided_map
from analysis.titan import coco_for_runs, dumps, run_objects
from dashboard.export import coco_zip
from dashboard.render import Scale, decode, label, overlay, with_colorbar
from dashboard.state import guarded, image_bytes, self_attention, store, store_path, word_map
from dashboard.text import plain
from dashboard.widgets import look, pick_run

DISPLAY_PX = 448
METHODS = ["DAAM + self-attention", "DAAM alone"]
COLOURS = ["#00e5ff", "#ff4081", "#76ff03", "#ffea00", "#e040fb", "#ff9100"]


def objects(run_id: str) -> list[tuple[str, str, bool]] | None:
    """The run's object nouns as stored with its tokens at generation time; None for runs before schema 1.3."""
    found = run_objects(store(), run_id)
    return None if found is None else [(o.word, o.lemma, o.plural) for o in found]


def threshold_picker() -> str | float:
    """Otsu (default) or a manual fraction of the map's maximum."""
    kind = st.radio("Threshold", ["Otsu", "Manual"], horizontal=True, key="detect_threshold_kind")
    if kind == "Otsu":
        return "otsu"
    return st.slider("Manual threshold (fraction of max)", 0.05, 0.95, 0.4, 0.05, key="detect_threshold")


def draw_detections(image: Image.Image, dets: list[Detection], size: tuple[int, int]) -> Image.Image:
    """Boxes, outlines and labels over an image shown at `image.size` (detections in `size` pixels)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    sx, sy = out.width / size[0], out.height / size[1]
    for i, d in enumerate(dets):
        colour = COLOURS[i % len(COLOURS)]
        x, y, w, h = d.bbox
        draw.rectangle([x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1], outline=colour, width=2)
        if len(d.polygon) >= 3:
            draw.polygon([(px * sx, py * sy) for px, py in d.polygon], outline=colour)
        label(draw, (x * sx + 4, y * sy + 3), d.label, colour, max(14, out.width // 28))
    return out


def body() -> None:
    st.title("Detect & Annotate")
    st.caption(
        "A word's cross-attention map finds its object; steering it through self-attention (the rows of the "
        "cells the word attends to, averaged) sharpens the map to the object's extent."
    )
    s = store()
    runs = s.runs()
    if not runs:
        st.info("No runs yet: generate one on Generate & Inspect, or build the gallery with `make demo`.")
        return
    run = s.run(pick_run(runs, "detect_run"))
    run_id, size, root = run["run_id"], (run["width"], run["height"]), store_path()
    words = s.words(run_id)
    if not words:
        st.warning("This prompt has no words.")
        return
    nouns = [w for w, _, _ in objects(run_id) or []]
    names = list(dict.fromkeys(w.word for w in words))
    default = names.index(nouns[0]) if nouns and nouns[0] in names else 0
    a, b = st.columns(2)
    word = a.selectbox("Word", names, index=default, key="detect_word")
    method = b.radio("Method", METHODS, horizontal=True, key="detect_method")
    threshold = threshold_picker()
    min_area = st.slider("Smallest region (% of image)", 0.0, 10.0, 0.5, 0.5, key="detect_min_area")
    alpha, cmap = look("detect", 0.45)
    heat = word_map(root, run_id, word, None, None)
    if method == METHODS[0]:
        sa = self_attention(root, run_id, None)
        heat = guided_map(heat, sa.matrix, sa.grid)
    dets = detect(heat, word, size, threshold, min_area / 100)
    image = decode(image_bytes(root, run_id, None))
    shown = (DISPLAY_PX, round(DISPLAY_PX * size[1] / size[0]))
    left, right = st.columns(2)
    with left:
        scale = Scale(0.0, float(heat.max()))
        units = "attention probability" if method == METHODS[1] else "self-attention-guided attention"
        st.image(
            with_colorbar(
                draw_detections(overlay(image, heat, alpha, cmap, size=shown, scale=scale), dets, size),
                cmap,
                scale,
                units,
            ),
            caption=f"'{plain(word)}' · {method} · {len(dets)} region(s)",
            width="stretch",
        )
        if dets:
            st.dataframe(
                [
                    {
                        "label": d.label,
                        "x": d.bbox[0],
                        "y": d.bbox[1],
                        "width": d.bbox[2],
                        "height": d.bbox[3],
                        "area px": d.area,
                        "score": round(d.score, 3),
                    }
                    for d in dets
                ],
                hide_index=True,
            )
        else:
            st.info("No region passes the threshold; lower it or the smallest-region size.")
    with right:
        titan(run, image, size, shown, threshold, method == METHODS[0])


def titan(run: dict, image: Image.Image, size, shown, threshold: str | float, guided: bool) -> None:
    """The prompt's objects as categories, annotated all at once, downloadable as COCO JSON."""
    st.subheader("TITAN annotations")
    objs = objects(run["run_id"])
    if objs is None:
        st.info(
            "Object nouns are not available for this run: it was generated before StepX stored them with "
            "the tokens. Generate it again to annotate it."
        )
        return
    if not objs:
        st.info("No object nouns were tagged in this prompt when it was generated.")
        return
    st.dataframe([{"word": w, "category": lemma, "plural": p} for w, lemma, p in objs], hide_index=True)
    if st.button("Annotate all objects", key="detect_annotate"):
        doc = coco_for_runs(store(), [run["run_id"]], threshold, guided)
        st.session_state["coco"] = (run["run_id"], doc)
    coco = st.session_state.get("coco")
    if coco and coco[0] == run["run_id"]:
        doc = coco[1]
        cats = {c["id"]: c["name"] for c in doc["categories"]}
        dets = [
            Detection(
                cats[a["category_id"]],
                tuple(a["bbox"]),
                list(zip(a["segmentation"][0][0::2], a["segmentation"][0][1::2], strict=True)),
                a["area"],
                a["score"],
                None,
            )
            for a in doc["annotations"]
        ]
        st.image(
            draw_detections(image.resize(shown), dets, size),
            caption=f"{len(dets)} annotations, {len(cats)} categories",
            width="stretch",
        )
        st.download_button(
            "Download COCO JSON", dumps(doc), f"stepx-{run['run_id']}-coco.json", "application/json", key="detect_coco"
        )
        st.download_button(
            "Download COCO ZIP (JSON + images)",
            coco_zip(store(), doc),
            f"stepx-{run['run_id']}-coco.zip",
            "application/zip",
            key="detect_coco_zip",
        )


guarded(body)
