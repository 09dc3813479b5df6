"""Guide: what each page answers, with one annotated screenshot each, the keyboard, and the words StepX uses.

The screenshots in docs/screenshots/ are taken and annotated by the browser test
(tests/test_browser_guide.py) on a store of real runs, so they show the pages as they are.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.text import definition_list

SCREENSHOTS = Path(__file__).resolve().parent.parent.parent / "docs" / "screenshots"

# page title -> (screenshot file, what the page answers, what the numbered marks on the screenshot show)
PAGES: dict[str, tuple[str, str, list[str]]] = {
    "Gallery": (
        "gallery.png",
        "Which runs are in this store? Browse the curated scenes and your own generations by tag, model or "
        "prompt text, and open any of them. While `make demo` builds the curated gallery behind the "
        "dashboard, a progress bar shows how far it is and runs appear as they finish.",
        [
            "Filters: tag, model and prompt text.",
            "A run's card: final image, prompt, model and seed.",
            "Inspect opens the run on Generate & Inspect.",
        ],
    ),
    "Generate & Inspect": (
        "inspect.png",
        "Which word shaped which region, and when? Generate an image (the request goes to the worker's queue; "
        "the new run opens when it is done, and a queued or running job can be cancelled), pick a word, move "
        "the step slider to watch its attention settle from noise into place, and export the evidence.",
        [
            "The word's attention over the step's preview, with its colorbar in attention probability.",
            "Content words first; function words and punctuation behind the toggle.",
            "The step slider (arrow keys move it once it has focus).",
            "Colour scale: per-map max, one scale across steps, fixed range or percentile clip.",
            "Export All: display-size PNGs, overlays, raw .npy arrays, CSV and GIFs in one ZIP.",
        ],
    ),
    "Regions": (
        "regions.png",
        "Which parts of the image belong together? Click a pixel, drag a box or draw a polygon (click the "
        "corners, then the first corner again to close it) and see which regions those places attend to in "
        "self-attention; the diffused heatmap spreads from one cell step by step.",
        [
            "The tools: pixel, box, polygon and diffused heatmap.",
            "Click or draw on the image (the picked pixel is marked).",
            "The region's self-attention with its colorbar.",
        ],
    ),
    "Detect & Annotate": (
        "detect.png",
        "Where is the object a word names? A word's attention, sharpened through self-attention, is "
        "thresholded (Otsu or by hand) into boxes and outlines; TITAN annotates all of the prompt's objects "
        "at once and exports COCO JSON, or a ZIP with the images.",
        [
            "Word, method and threshold.",
            "Detected regions with legible labels over the heatmap.",
            "TITAN: the prompt's objects as COCO categories.",
        ],
    ),
    "Compare": (
        "compare.png",
        "How do runs differ? Two to four runs side by side on the same word, step and colour scale, the "
        "difference of two maps on a diverging scale, and curves of each word's mass, peak and centroid over "
        "the steps.",
        [
            "The runs to compare (or find related ones).",
            "One colour scale for all runs, with its colorbar.",
            "Per-step curves and a per-word table.",
        ],
    ),
    "SQL console": (
        "sql.png",
        "Anything else: read-only SQL (DuckDB) over the store's tables (runs, tokens, per-step word "
        "statistics, raw attention). Example questions fill the editor; results download as CSV and chart.",
        ["Ready questions.", "The query editor (read-only; time and row limits).", "Results, CSV and a chart."],
    ),
    "Guide": (
        "guide.png",
        "This page: what each page answers, the keyboard, and the glossary.",
        ["Each page with its screenshot.", "The glossary."],
    ),
}

KEYBOARD = {
    "Step slider": "Click the slider (or Tab to it); the left and right arrow keys then move one step, "
    "Home and End jump to the first and last step.",
    "Any slider": "The same keys work on every slider (overlay alpha, iterations, thresholds).",
    "Polygon": "Click each corner, then click the first corner again to close the polygon.",
}

GLOSSARY = {
    "Denoising step": "The model starts from pure noise and removes a little of it at each step. Step 1 is the "
    "noisiest; the last step gives the final image. Each step's preview is the model's current guess of the "
    "finished picture. Steps are numbered from 1 everywhere: slider, files and CSV.",
    "Cross-attention": "How each image location looks at the prompt. At every step, each pixel of the UNet's "
    "feature map spreads one unit of attention over the prompt's tokens; a word's heat map shows how much of it "
    "each location gave to that word.",
    "Self-attention": "How image locations look at each other. It tells which regions the model treats as one "
    "thing: pick a pixel and see which other pixels it draws on.",
    "Token / focus word": "The prompt is split into tokens (word pieces). Long words can be several tokens; StepX "
    "merges them back into the word you typed. The focus word is the one whose map you are looking at.",
    "Truncated prompt": "The text encoder reads a fixed number of tokens; the rest of a longer prompt is cut. "
    "Inspect says so and shows the words that were cut: they have no maps and did not shape the image.",
    "Global attention": "The attention of all the prompt's words together (the start and end tokens are left "
    "out): where the prompt as a whole acted.",
    "Resolution levels": "The UNet works at several sizes (for SD 1.5 at 512 px: 64x64 down to 8x8). StepX "
    "upsamples each level to one grid and averages them; you can look at one level alone.",
    "All steps (aggregate)": "The word's maps summed over every step: the DAAM heat map of the whole generation.",
    "Overlay alpha": "How strongly the heat map covers the image: 0 shows only the image, 1 only the map.",
    "Colour scale": "Every map has a colorbar in its units (attention probability). Per-map max shows shape; "
    "one scale across steps makes steps comparable; a fixed range makes words and runs comparable; a "
    "percentile clip stops one hot pixel from washing out the rest. Colormaps are matplotlib's perceptually "
    "uniform ones (viridis, magma, inferno, cividis); differences use a diverging map (RdBu) centred on 0.",
    "Raw values": "Maps are stored as attention probabilities on the latent grid; the caption gives the raw "
    "range so two maps can be compared honestly. For display they are upsampled bicubically.",
    "Export evidence": "GIF Animation shows one word over all steps on one colour scale; Export All packs every "
    "token's map at every step as display-size PNGs (colour and overlay), the raw arrays as .npy, the values as "
    "CSV (its columns are explained in the ZIP's README.txt), one GIF per token, the run's settings (enough to "
    "regenerate it) and the final image.",
}


st.title("Guide")
st.write(
    "StepX explains one text-to-image generation from the inside: which prompt word shaped which region, "
    "at which denoising step."
)
st.header("What each page answers")
for name, (shot, text, marks) in PAGES.items():
    st.subheader(name)
    st.markdown(text)
    path = SCREENSHOTS / shot
    if path.exists():
        st.image(str(path), width="stretch", caption=f"{name}: the numbered marks are explained below.")
    st.markdown("\n".join(f"{i}. {m}" for i, m in enumerate(marks, 1)))
st.header("Keyboard")
st.markdown(definition_list(KEYBOARD))
st.header("Glossary")
st.markdown(definition_list(GLOSSARY))
