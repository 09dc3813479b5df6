"""Pictures from maps: colormaps, colour scales, colorbars, overlays, grids and GIFs.

numpy + PIL + matplotlib's colormaps (no Streamlit, no torch). Map values are upsampled for display
with the project's one bicubic definition, `schema.maps.upsample`; PIL only resizes photographs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import imageio.v3 as iio
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from schema.maps import upsample

# matplotlib's perceptually uniform sequential maps (plus gray); a diverging one for differences.
COLORMAPS: tuple[str, ...] = ("viridis", "magma", "inferno", "cividis", "gray")
DIVERGING = "RdBu_r"  # blue = negative, white = 0, red = positive
UNITS = "attention probability"

# How a map's values become colours; the caption and colorbar always show the scale used.
NORMALISATIONS: dict[str, str] = {
    "per-map max": "0 to this map's maximum: shape is clear, but maps can't be compared by colour.",
    "one scale across steps": "0 to the word's maximum over all steps: colours are comparable between steps.",
    "fixed range": "A range you type: colours are comparable between words, steps and runs.",
    "percentile clip": "0 to a percentile of this map: one hot pixel no longer washes the rest out.",
}


@dataclass(frozen=True)
class Scale:
    """A colour scale: values at `lo` get the colormap's first colour, at `hi` its last."""

    lo: float
    hi: float

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """Values mapped to 0-1 (clipped); a degenerate scale gives zeros, never a flat full colour."""
        span = self.hi - self.lo
        if not np.isfinite(span) or span <= 0:
            return np.zeros(values.shape, dtype=np.float32)
        return np.clip((values.astype(np.float32) - self.lo) / span, 0, 1)


def scale_for(
    heat: np.ndarray,
    mode: str = "per-map max",
    *,
    across_max: float | None = None,
    fixed: tuple[float, float] = (0.0, 1.0),
    percentile: float = 99.0,
) -> Scale:
    """The colour scale a normalisation mode gives for one map (see NORMALISATIONS)."""
    if mode == "per-map max":
        return Scale(0.0, float(heat.max()))
    if mode == "one scale across steps":
        return Scale(0.0, float(heat.max() if across_max is None else across_max))
    if mode == "fixed range":
        return Scale(float(fixed[0]), float(fixed[1]))
    if mode == "percentile clip":
        return Scale(0.0, float(np.percentile(heat, percentile)))
    raise ValueError(f"unknown normalisation {mode!r}; choose one of {', '.join(NORMALISATIONS)}")


@lru_cache(maxsize=16)
def _lut(name: str) -> np.ndarray:
    """(256, 3) uint8 colours of a matplotlib colormap."""
    if name not in COLORMAPS and name != DIVERGING:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    rgba = colormaps[name](np.linspace(0, 1, 256))
    lut = (rgba[:, :3] * 255).round().astype(np.uint8)
    lut.flags.writeable = False
    return lut


def colorize(heat01: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(h, w) values in 0-1 -> (h, w, 3) uint8 colours."""
    idx = np.nan_to_num(heat01) * 255 + 0.5
    np.clip(idx, 0, 255, out=idx)
    if idx.ndim != 2:
        return _lut(cmap)[idx.astype(np.uint8)]
    img = Image.fromarray(idx.astype(np.uint8), "L")
    img.putpalette(_lut(cmap).tobytes())  # the palette lookup in C: ~10x numpy's fancy indexing at 512 px
    return np.asarray(img.convert("RGB"))


def display_values(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map's values at display size (width, height): bicubic `schema.maps.upsample`, clamped at 0."""
    return upsample(heat, size[1], size[0])


def heat_image(heat: np.ndarray, scale: Scale, cmap: str, size: tuple[int, int]) -> Image.Image:
    """The map alone in colour at display size."""
    return Image.fromarray(colorize(scale.normalise(display_values(heat, size)), cmap))


def overlay(
    base: Image.Image,
    heat: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmax: float | None = None,
    size: tuple[int, int] | None = None,
    scale: Scale | None = None,
) -> Image.Image:
    """The heat map over `base`, blended with `alpha`; colours on `scale` (default 0 to `vmax` or the map's max)."""
    size = size or base.size
    scale = scale or Scale(0.0, float(heat.max()) if vmax is None else float(vmax))
    colours = colorize(scale.normalise(display_values(heat, size)), cmap)
    return blend(base, colours, alpha)


def blend(base: Image.Image, colours: np.ndarray, alpha: float) -> Image.Image:
    """`colours` (h, w, 3 uint8) over `base` resized to match, with weight `alpha` (PIL's blend, in C)."""
    size = (colours.shape[1], colours.shape[0])
    if base.mode != "RGB" or base.size != size:
        base = base.convert("RGB").resize(size, Image.BICUBIC)
    return Image.blend(base, Image.fromarray(colours), float(alpha))


@lru_cache(maxsize=8)
def font(size: int = 15) -> ImageFont.FreeTypeFont:
    """PIL's bundled scalable font at a size legible on a 512 px image."""
    return ImageFont.load_default(size=size)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def colorbar(cmap: str, scale: Scale, height: int, label: str = UNITS, width: int = 118) -> Image.Image:
    """A vertical colorbar (high at the top) with tick values and the units, `height` px tall."""
    out = Image.new("RGB", (width, height), "white")
    pad, bar_w = 10, 18
    bar_h = max(2, height - 2 * pad)
    grad = np.linspace(1, 0, bar_h, dtype=np.float32)[:, None].repeat(bar_w, axis=1)  # top = high
    out.paste(Image.fromarray(colorize(grad, cmap)), (8, pad))
    draw = ImageDraw.Draw(out)
    draw.rectangle([8, pad, 8 + bar_w - 1, pad + bar_h - 1], outline=(60, 60, 60))
    small = font(13)
    degenerate = not scale.hi > scale.lo
    for value in [scale.lo] if degenerate else _ticks(scale.lo, scale.hi):
        frac = 0.0 if degenerate else (value - scale.lo) / (scale.hi - scale.lo)
        y = pad + (1 - frac) * (bar_h - 1)
        draw.line([8 + bar_w, y, 8 + bar_w + 4, y], fill=(60, 60, 60))
        draw.text((8 + bar_w + 7, y), f"{value:.3g}", fill=(20, 20, 20), font=small, anchor="lm")
    text = Image.new("RGB", (bar_h, 18), "white")
    ImageDraw.Draw(text).text((bar_h // 2, 9), label, fill=(20, 20, 20), font=small, anchor="mm")
    out.paste(text.rotate(90, expand=True), (width - 20, pad))
    return out


def with_colorbar(image: Image.Image, cmap: str, scale: Scale, label: str = UNITS) -> Image.Image:
    """The image with its colorbar beside it on the right."""
    bar = colorbar(cmap, scale, image.height, label)
    out = Image.new("RGB", (image.width + bar.width, image.height), "white")
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(bar, (image.width, 0))
    return out


def difference_image(a: np.ndarray, b: np.ndarray, size: tuple[int, int]) -> tuple[Image.Image, float]:
    """a - b on the diverging colormap symmetric around 0 (with its colorbar); returns the image and the limit."""
    diff = a.astype(np.float32) - b.astype(np.float32)
    limit = float(np.abs(diff).max())
    scale = Scale(-limit, limit)
    values = upsample(diff + limit, size[1], size[0]) - limit  # upsample clamps at 0, so shift first
    img = Image.fromarray(colorize(scale.normalise(values), DIVERGING))
    return with_colorbar(img, DIVERGING, scale, f"difference ({UNITS})"), limit


def mark_point(image: Image.Image, xy: tuple[float, float], radius: int = 7) -> Image.Image:
    """A crosshair at (x, y) image pixels, visible on light and dark images."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    x, y = xy
    for colour, width in (((0, 0, 0), 4), ((0, 229, 255), 2)):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=width)
        draw.line([x - 2 * radius, y, x - radius, y], fill=colour, width=width)
        draw.line([x + radius, y, x + 2 * radius, y], fill=colour, width=width)
        draw.line([x, y - 2 * radius, x, y - radius], fill=colour, width=width)
        draw.line([x, y + radius, x, y + 2 * radius], fill=colour, width=width)
    return out


def label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: str, size: int = 16) -> None:
    """Legible text: the label on a dark box at `xy` (its top-left corner)."""
    f = font(size)
    left, top, right, bottom = draw.textbbox(xy, text, font=f)
    draw.rectangle([left - 3, top - 2, right + 3, bottom + 2], fill=(0, 0, 0))
    draw.text(xy, text, fill=colour, font=f)


def grid(images: list[Image.Image], per_row: int = 10, gap: int = 4) -> Image.Image:
    """Equal-size thumbnails in rows of `per_row` on a white background (never one long shrinking strip)."""
    if not images:
        raise ValueError("a grid needs at least one image")
    w, h = images[0].size
    cols = min(per_row, len(images))
    rows = -(-len(images) // cols)
    out = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(img.resize((w, h)), (c * (w + gap), r * (h + gap)))
    return out


def gif_bytes(frames: list[Image.Image], frame_ms: int = 200) -> bytes:
    """An animated, looping GIF of the frames, written by imageio.

    All frames share one 256-colour palette (fast octree over a sample of frames, no dithering), so
    encoding takes a fraction of a second instead of a per-frame median cut.
    """
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    rgb = [f.convert("RGB") for f in frames]
    sample = rgb[:: max(1, len(rgb) // 6)]
    mosaic = Image.new("RGB", (sample[0].width, sample[0].height * len(sample)))
    for i, f in enumerate(sample):
        mosaic.paste(f.resize(sample[0].size), (0, i * sample[0].height))
    palette = mosaic.quantize(256, method=Image.Quantize.FASTOCTREE)
    indices = np.stack([np.asarray(f.quantize(palette=palette, dither=Image.Dither.NONE)) for f in rgb])
    return iio.imwrite(
        "<bytes>",
        indices,
        extension=".gif",
        mode="L",
        is_batch=True,
        duration=frame_ms,
        loop=0,
        palette=bytes(palette.getpalette()[:768]),
        optimize=False,
    )


def png_bytes(img: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes; `compress_level` 1 is ~3x faster for bulk exports at a few percent more size."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    """Open encoded image bytes as an RGB PIL image."""
    return Image.open(io.BytesIO(data)).convert("RGB")
