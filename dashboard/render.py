"""Pictures from maps: colormaps, overlays, strips and GIFs (numpy + PIL; no Streamlit, no torch)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Colormaps as anchor colours, linearly interpolated (sampled from the published maps).
COLORMAPS: dict[str, list[str]] = {
    "inferno": ["#000004", "#420a68", "#932667", "#dd513a", "#fca50a", "#fcffa4"],
    "viridis": ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"],
    "magma": ["#000004", "#3b0f70", "#8c2981", "#de4968", "#fe9f6d", "#fcfdbf"],
    "jet": ["#00007f", "#0000ff", "#00ffff", "#7fff7f", "#ffff00", "#ff0000", "#7f0000"],
    "gray": ["#000000", "#ffffff"],
}
DIVERGING = ["#3b4cc0", "#8db0fe", "#f2f2f2", "#f49a7b", "#b40426"]  # blue = negative, red = positive


def _lut(name: str) -> np.ndarray:
    stops = DIVERGING if name == "diverging" else COLORMAPS.get(name)
    if stops is None:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in stops], dtype=np.float64)
    xs = np.linspace(0, 1, len(anchors))
    grid = np.linspace(0, 1, 256)
    return np.stack([np.interp(grid, xs, anchors[:, ch]) for ch in range(3)], axis=1).round().astype(np.uint8)


def colorize(heat01: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(h, w) values in 0-1 -> (h, w, 3) uint8 colours."""
    idx = np.clip(np.nan_to_num(heat01) * 255, 0, 255).astype(np.uint8)
    return _lut(cmap)[idx]


def resize_map(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float map to (width, height) with bicubic resampling, clamped at 0."""
    img = Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.BICUBIC)
    return np.maximum(np.asarray(img), 0)


def overlay(
    base: Image.Image,
    heat: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmax: float | None = None,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """The heat map (normalised by `vmax`, default its own max) over `base`, blended with `alpha`."""
    size = size or base.size
    base = base.convert("RGB").resize(size, Image.BICUBIC)
    peak = float(heat.max()) if vmax is None else float(vmax)
    norm = np.clip(heat / peak, 0, 1) if peak > 0 else np.zeros_like(heat)
    colours = colorize(resize_map(norm, size), cmap)
    mixed = (1 - alpha) * np.asarray(base, dtype=np.float32) + alpha * colours.astype(np.float32)
    return Image.fromarray(mixed.round().astype(np.uint8))


def difference_image(a: np.ndarray, b: np.ndarray, size: tuple[int, int]) -> tuple[Image.Image, float]:
    """a - b on a blue-white-red scale symmetric around 0; returns the image and the scale's limit."""
    diff = a.astype(np.float32) - b.astype(np.float32)
    limit = float(np.abs(diff).max())
    norm = 0.5 + 0.5 * diff / limit if limit > 0 else np.full(diff.shape, 0.5, dtype=np.float32)
    img = Image.fromarray(colorize(norm, "diverging")).resize(size, Image.BICUBIC)
    return img, limit


def strip(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """Images side by side on a white background."""
    w = sum(i.width for i in images) + gap * (len(images) - 1)
    h = max(i.height for i in images)
    out = Image.new("RGB", (w, h), "white")
    x = 0
    for img in images:
        out.paste(img, (x, 0))
        x += img.width + gap
    return out


def gif_bytes(frames: list[Image.Image], frame_ms: int = 200) -> bytes:
    """An animated, looping GIF of the frames."""
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    """Open encoded image bytes as an RGB PIL image."""
    return Image.open(io.BytesIO(data)).convert("RGB")
