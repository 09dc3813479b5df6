"""Guide: what each page answers, and the words StepX uses."""

from __future__ import annotations

import streamlit as st

PAGES = {
    "Gallery": "Which runs are in this store? Browse the curated scenes and your own generations by theme, "
    "model or prompt text, and open any of them.",
    "Generate & Inspect": "Which word shaped which region, and when? Generate an image, pick a word (or Global), "
    "move the step slider to watch its attention settle from noise into place, and export the evidence.",
}

GLOSSARY = {
    "Denoising step": "The model starts from pure noise and removes a little of it at each step. Step 1 is the "
    "noisiest; the last step gives the final image. Each step's preview is the model's current guess of the "
    "finished picture.",
    "Cross-attention": "How each image location looks at the prompt. At every step, each pixel of the UNet's "
    "feature map spreads one unit of attention over the prompt's tokens; a word's heat map shows how much of it "
    "each location gave to that word.",
    "Self-attention": "How image locations look at each other. It tells which regions the model treats as one "
    "thing: pick a pixel and see which other pixels it draws on.",
    "Token / focus word": "The prompt is split into tokens (word pieces). Long words can be several tokens; StepX "
    "merges them back into the word you typed. The focus word is the one whose map you are looking at.",
    "Global attention": "The attention of all the prompt's words together (the start and end tokens are left "
    "out): where the prompt as a whole acted.",
    "Resolution levels": "The UNet works at several sizes (for SD 1.5 at 512 px: 64x64 down to 8x8). StepX "
    "upsamples each level to one grid and averages them; you can look at one level alone.",
    "All steps (aggregate)": "The word's maps summed over every step: the DAAM heat map of the whole generation.",
    "Overlay alpha": "How strongly the heat map covers the image: 0 shows only the image, 1 only the map.",
    "Raw values": "Maps are stored as attention probabilities. The colours are scaled to each map's maximum for "
    "display; the caption gives the raw range so two maps can be compared honestly.",
    "Export evidence": "GIF Animation shows one word over all steps on a fixed colour scale; Export All packs "
    "every token's map at every step as PNG, the raw values as CSV, one GIF per token, the run's settings "
    "(enough to regenerate it) and the final image.",
}


st.title("Guide")
st.write(
    "StepX explains one text-to-image generation from the inside: which prompt word shaped which region, "
    "at which denoising step."
)
st.header("What each page answers")
for name, text in PAGES.items():
    st.markdown(f"**{name}**: {text}")
st.header("Glossary")
for term, text in GLOSSARY.items():
    st.markdown(f"**{term}**: {text}")
