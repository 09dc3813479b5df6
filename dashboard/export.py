"""Export All: one ZIP with every token x step map, the values as CSV, a GIF per token, the run's
metadata and the final image. Built only when asked (it reads the whole run)."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile

import numpy as np

from dashboard.render import decode, gif_bytes, overlay, png_bytes
from store import Store


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "token"


def export_all(store: Store, run_id: str, cmap: str = "inferno", alpha: float = 0.6) -> bytes:
    """ZIP bytes: maps/, values.csv, gifs/, run.json, final.png for one run."""
    run = store.run(run_id)
    tokens = {t["token_index"]: t for t in store.tokens(run_id)}
    token_ids, maps = store.token_maps(run_id)  # (steps, tokens, H, W)
    final = decode(store.image(run_id)[0])
    steps = list(range(maps.shape[0]))
    previews = [decode(store.image(run_id, s)[0]) for s in steps]
    size = final.size
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        csv_buf = io.StringIO()
        writer = csv.writer(csv_buf)
        writer.writerow(["run_id", "step", "token", "word", "y", "x", "value"])
        h, w = maps.shape[2:]
        ys, xs = np.divmod(np.arange(h * w), w)
        for ti, tok in enumerate(token_ids):
            info = tokens[tok]
            name = f"{tok:02d}-{_slug(info['token_text'])}"
            vmax = float(maps[:, ti].max())
            frames = []
            for s in steps:
                m = maps[s, ti]
                frame = overlay(previews[s], m, alpha, cmap, vmax=vmax, size=size)
                frames.append(frame)
                zf.writestr(f"maps/step-{s:03d}/token-{name}.png", png_bytes(frame))
                word = info["word"] if info["word"] is not None else info["token_text"]
                for y, x, v in zip(ys.tolist(), xs.tolist(), m.reshape(-1).tolist(), strict=True):
                    writer.writerow([run_id, s, tok, word, y, x, f"{v:.6g}"])
            zf.writestr(f"gifs/token-{name}.gif", gif_bytes(frames))
        zf.writestr("values.csv", csv_buf.getvalue())
        meta = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in run.items()}
        meta["tokens"] = list(tokens.values())
        zf.writestr("run.json", json.dumps(meta, indent=2, default=str))
        zf.writestr("final.png", png_bytes(final))
        depth = store.depth(run_id)
        if depth is not None:
            dmap, info = depth
            zf.writestr("depth/depth.png", png_bytes(overlay(final, dmap - dmap.min(), 1.0, "viridis")))
            dy, dx = np.divmod(np.arange(dmap.size), dmap.shape[1])
            rows = "\n".join(f"{y},{x},{v:.6g}" for y, x, v in zip(dy, dx, dmap.reshape(-1).tolist(), strict=True))
            zf.writestr("depth/depth.csv", "y,x,depth\n" + rows + "\n")
            zf.writestr("depth/info.json", json.dumps(info, indent=2))
        zf.writestr(
            "README.txt",
            f"StepX export of run {run_id}: maps/step-SSS/token-TT-*.png are each token's cross-attention over that "
            "step's preview (colour scale fixed per token over all steps); values.csv holds the raw map values "
            f"(attention probability, levels averaged on the {h}x{w} latent grid); gifs/ animate each token over "
            "the steps.\n",
        )
    return buf.getvalue()
