"""Export All: one ZIP with every token x step map for a paper: colour PNGs and overlays at the display
size, the raw-resolution arrays as .npy, the values as CSV, a GIF per token, the run's metadata and the
final image. Steps are numbered from 1 (the noisiest) in every name a person reads, as on the slider.
Built only when asked (it reads the whole run)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from dashboard.render import (
    UNITS,
    Scale,
    blend,
    colorbar,
    colorize,
    decode,
    display_values,
    gif_bytes,
    overlay,
    png_bytes,
    with_colorbar,
)
from store import Store

STORED = zipfile.ZIP_STORED  # PNG, GIF and a finished PNG do not deflate further; don't spend time trying

README = """StepX export of run {run_id}

Steps are numbered from 1 (the first, noisiest step) to {steps} (the last), as on the dashboard's slider.
Tokens are numbered by their position in the text encoder's input (0 = the start token).

maps/step-SSS/token-TT-WORD.png      the token's cross-attention at step SSS, {w}x{h} px (the display size):
                                     the {gh}x{gw} latent-grid values upsampled bicubically (StepX's one
                                     definition, schema/maps.py) and coloured with {cmap}; the colour scale
                                     is fixed per token over all steps (colorbars/token-TT-WORD.png).
overlays/step-SSS/token-TT-WORD.png  the same map over that step's preview image (alpha {alpha:g}).
colorbars/token-TT-WORD.png          the token's colour scale, in {units}.
arrays/token-TT-WORD.npy             raw values, float32 array of shape (steps, {gh}, {gw}) = (step - 1, y, x):
                                     {units} per latent pixel, resolution levels averaged.
values.csv                           the same raw values as a long table, columns:
                                       run_id       the run
                                       step         denoising step, 1 = first (noisiest) ... {steps} = last
                                       token_index  position in the encoder input (0 = start token)
                                       word         the prompt word the token belongs to
                                       y, x         latent-grid row and column (0-based, {gh}x{gw} grid)
                                       value        {units}
gifs/token-TT-WORD.gif               the overlay over all steps, at half the display size.
run.json                             every setting of the run (enough to regenerate it) and its tokens.
final.png                            the final image.
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "token"


def step_name(step_index: int) -> str:
    """The 1-based folder name of a 0-based step index: step-001 for the first step."""
    return f"step-{step_index + 1:03d}"


def _values_csv(run_id: str, token_ids: list[int], words: list[str], maps: np.ndarray) -> str:
    """The long table of raw values, step 1-based (vectorised: 225k rows for a 20-step run)."""
    steps, n_tok, h, w = maps.shape
    s, t, y, x = np.meshgrid(np.arange(steps), np.arange(n_tok), np.arange(h), np.arange(w), indexing="ij")
    buf = io.StringIO()
    csv.writer(buf).writerow(["run_id", "step", "token_index", "word", "y", "x", "value"])
    words_col = np.asarray([csv_field(wd) for wd in words], dtype=object)[t.ravel()]
    toks = np.asarray(token_ids)[t.ravel()]
    values = np.char.mod("%.6g", maps.astype(np.float64).ravel())
    lines = [
        f"{run_id},{a},{b},{c},{d},{e},{f}"
        for a, b, c, d, e, f in zip(
            (s.ravel() + 1).tolist(),
            toks.tolist(),
            words_col.tolist(),
            y.ravel().tolist(),
            x.ravel().tolist(),
            values.tolist(),
            strict=True,
        )
    ]
    buf.write("\r\n".join(lines) + "\r\n")
    return buf.getvalue()


def csv_field(text: str) -> str:
    """One CSV field, quoted as the csv module would."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([text])
    return buf.getvalue()


def export_all(
    store: Store, run_id: str, cmap: str = "inferno", alpha: float = 0.6, size: tuple[int, int] | None = None
) -> bytes:
    """ZIP bytes: maps/, overlays/, colorbars/, arrays/, values.csv, gifs/, run.json, final.png, README.txt.

    `size` is the display size (width, height) of the PNGs; default 512 px wide, as Inspect shows them.
    """
    run = store.run(run_id)
    tokens = {t["token_index"]: t for t in store.tokens(run_id)}
    token_ids, maps = store.token_maps(run_id)  # (steps, tokens, H, W)
    final = decode(store.image(run_id)[0])
    size = size or (512, round(512 * run["height"] / run["width"]))
    steps = maps.shape[0]
    previews = [decode(store.image(run_id, s)[0]).resize(size, Image.BICUBIC) for s in range(steps)]
    h, w = maps.shape[2:]
    words = []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        for ti, tok in enumerate(token_ids):
            info = tokens[tok]
            words.append(info["word"] if info["word"] is not None else info["token_text"])
            name = f"token-{tok:02d}-{_slug(info['token_text'])}"
            scale = Scale(0.0, float(maps[:, ti].max()))
            shown = display_values(maps[:, ti], size)  # (steps, height, width)
            colours = [colorize(scale.normalise(shown[s]), cmap) for s in range(steps)]
            frames = [blend(previews[s], colours[s], alpha) for s in range(steps)]
            encoded = pool.map(lambda im: png_bytes(im, 1), [Image.fromarray(c) for c in colours] + frames)
            for s, data in enumerate(encoded):
                folder = "maps" if s < steps else "overlays"
                zf.writestr(f"{folder}/{step_name(s % steps)}/{name}.png", data, STORED)
            gif_frames = [f.resize((size[0] // 2, size[1] // 2), Image.BICUBIC) for f in frames]
            zf.writestr(f"gifs/{name}.gif", gif_bytes(gif_frames), STORED)
            zf.writestr(f"colorbars/{name}.png", png_bytes(colorbar(cmap, scale, size[1])), STORED)
            npy = io.BytesIO()
            np.save(npy, maps[:, ti].astype(np.float32))
            zf.writestr(f"arrays/{name}.npy", npy.getvalue())
        zf.writestr("values.csv", _values_csv(run_id, token_ids, words, maps))
        meta = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in run.items()}
        meta["tokens"] = list(tokens.values())
        zf.writestr("run.json", json.dumps(meta, indent=2, default=str))
        zf.writestr("final.png", png_bytes(final), STORED)
        depth = store.depth(run_id)
        if depth is not None:
            dmap, dinfo = depth
            dscale = Scale(0.0, float(dmap.max() - dmap.min()))
            dimg = with_colorbar(
                overlay(final, dmap - dmap.min(), 1.0, "viridis", size=size, scale=dscale), "viridis", dscale, "depth"
            )
            zf.writestr("depth/depth.png", png_bytes(dimg), STORED)
            np_buf = io.BytesIO()
            np.save(np_buf, dmap.astype(np.float32))
            zf.writestr("depth/depth.npy", np_buf.getvalue())
            zf.writestr("depth/info.json", json.dumps(dinfo, indent=2))
        zf.writestr(
            "README.txt",
            README.format(
                run_id=run_id, steps=steps, w=size[0], h=size[1], gh=h, gw=w, cmap=cmap, alpha=alpha, units=UNITS
            ),
        )
    return buf.getvalue()


def coco_zip(store: Store, doc: dict) -> bytes:
    """A COCO document as annotations.json beside images/<file_name>, the final image of every run it names."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations.json", json.dumps(doc, indent=1))
        for img in doc["images"]:
            zf.writestr(f"images/{img['file_name']}", store.image(img["stepx_run_id"])[0], STORED)
    return buf.getvalue()
