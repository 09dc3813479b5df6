"""Regions: which image regions attend to the pixel, box or polygon you pick (self-attention)."""

from __future__ import annotations

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw

from analysis.regions import (
    RegionInputError,
    bbox_cells,
    diffuse,
    parse_bbox,
    parse_indices,
    parse_polygon,
    pixel_cell,
    polygon_cells,
    region_map,
    validate_polygon,
)
from dashboard.canvas import click_to_pixel, last_object, path_to_points, rect_to_box
from dashboard.render import decode, gif_bytes, grid, label, mark_point, overlay, with_colorbar
from dashboard.state import guarded, image_bytes, self_attention, store, store_path
from dashboard.text import plain
from dashboard.widgets import look, normalisation, pick_run, scale_of

TOOLS = ["Pixel heatmap", "BBox heatmap", "Contour heatmap", "Pixel diffused heatmap"]
CANVAS_PX = 384
UNITS = "self-attention probability"
STRIP_FRAMES = 20  # the diffusion strip shows at most this many iterations, in rows of 5 legible thumbnails


def source_picker(steps: int) -> int | None:
    """All-steps self-attention or one step's."""
    kind = st.radio("Self-attention", ["All steps (aggregate)", "One step"], horizontal=True, key="regions_source")
    if kind == "One step":
        return st.slider("Step", 1, steps, steps, key="regions_step") - 1
    return None


def pixel_input(image: Image.Image, size: tuple[int, int], grid: tuple[int, int], typed: bool, key: str) -> list[int]:
    """Grid cells from a click on the image or typed indices."""
    n = grid[0] * grid[1]
    if typed:
        text = st.text_input(f"Query cells (row-major on the {grid[0]}x{grid[1]} grid, 0-{n - 1})", "0", key=key)
        return parse_indices(text, grid)
    from streamlit_image_coordinates import streamlit_image_coordinates

    shown = display_size(size)
    before = click_to_pixel(st.session_state.get(f"{key}_click"), size)
    picture = image.resize(shown)
    if before is not None:  # mark the picked pixel on the input image itself
        picture = mark_point(picture, (before[0] * shown[0] / size[0], before[1] * shown[1] / size[1]))
    value = streamlit_image_coordinates(picture, key=f"{key}_click")
    pixel = click_to_pixel(value, size)
    if pixel is None:
        st.caption("Click the image to pick a pixel.")
        return []
    st.caption(f"Pixel ({pixel[0]:.0f}, {pixel[1]:.0f})")
    return [pixel_cell(*pixel, size, grid)]


def display_size(size: tuple[int, int]) -> tuple[int, int]:
    return CANVAS_PX, round(CANVAS_PX * size[1] / size[0])


def shape_input(tool: str, image: Image.Image, size: tuple[int, int], grid: tuple[int, int], typed: bool) -> list[int]:
    """Grid cells inside a drawn or typed box / polygon."""
    w, h = size
    if typed:
        if tool == "BBox heatmap":
            return bbox_cells(
                parse_bbox(
                    st.text_input("Box x1,y1,x2,y2 (image pixels)", f"0,0,{w // 2},{h // 2}", key="regions_box_text"),
                    size,
                ),
                size,
                grid,
            )
        text = st.text_input(
            "Polygon 'x1,y1 x2,y2 x3,y3' (image pixels)", f"0,0 {w // 2},0 0,{h // 2}", key="regions_poly_text"
        )
        return polygon_cells(parse_polygon(text, size), size, grid)
    from streamlit_drawable_canvas import st_canvas

    shown = display_size(size)
    mode = "rect" if tool == "BBox heatmap" else "polygon"
    result = st_canvas(
        fill_color="rgba(255, 255, 255, 0.2)",
        stroke_width=2,
        stroke_color="#00e5ff",
        background_image=image.resize(shown),
        height=shown[1],
        width=shown[0],
        drawing_mode=mode,
        key=f"regions_canvas_{mode}",
    )
    st.caption(
        "Drag a rectangle."
        if mode == "rect"
        else "Click the corners, then click the first corner again to close the polygon."
    )
    if mode == "rect":
        obj = last_object(result.json_data, ("rect",))
        if obj is None:
            return []
        box = rect_to_box(obj, shown, size)
        st.caption(f"Box {', '.join(f'{v:.0f}' for v in box)}")
        return bbox_cells(parse_bbox(",".join(str(v) for v in box), size), size, grid)
    obj = last_object(result.json_data, ("path", "polygon"))
    if obj is None:
        return []
    points = validate_polygon(path_to_points(obj, shown, size), size)
    st.caption(f"Polygon of {len(points)} points")
    return polygon_cells(points, size, grid)


def mark_cells(image: Image.Image, cells: list[int], grid: tuple[int, int]) -> Image.Image:
    """Outline the selected grid cells on the image."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    cw, ch = out.width / grid[1], out.height / grid[0]
    for c in cells:
        r, k = divmod(c, grid[1])
        draw.rectangle([k * cw, r * ch, (k + 1) * cw - 1, (r + 1) * ch - 1], outline=(0, 229, 255))
    return out


def body() -> None:
    st.title("Regions")
    st.caption(
        "Self-attention answers: which image regions does the model treat as belonging with the place you "
        "pick? Each map is the mean of the selected query cells' attention rows."
    )
    s = store()
    runs = s.runs()
    if not runs:
        st.info("No runs yet: generate one on Generate & Inspect, or build the gallery with `make demo`.")
        return
    run = s.run(pick_run(runs, "regions_run"))
    run_id, size = run["run_id"], (run["width"], run["height"])
    step = source_picker(run["steps"])
    sa = self_attention(store_path(), run_id, step)
    grid = sa.grid
    st.caption(f"Query grid {grid[0]}x{grid[1]} (cells 0-{grid[0] * grid[1] - 1}, row-major)")
    tool = st.radio("Tool", TOOLS, horizontal=True, key="regions_tool")
    typed = st.radio("Input", ["Draw / click", "Type"], horizontal=True, key="regions_mode") == "Type"
    alpha, cmap = look("regions")
    norm = normalisation("regions", with_across=False)
    image = decode(image_bytes(store_path(), run_id, step)).resize(size)
    left, right = st.columns(2)
    with left:
        try:
            if tool in ("Pixel heatmap", "Pixel diffused heatmap"):
                cells = pixel_input(
                    image, size, grid, typed, key=f"regions_{'diffuse' if 'diffused' in tool else 'px'}"
                )
                if "diffused" in tool and len(cells) > 1:
                    st.info(f"Diffusion starts from one cell; using the first, {cells[0]}.")
                    cells = cells[:1]
            else:
                cells = shape_input(tool, image, size, grid, typed)
        except RegionInputError as exc:
            st.error(plain(str(exc)))
            return
    with right:
        if not cells:
            st.info("Pick a place on the image to see its self-attention.")
            return
        shown = display_size(size)
        if tool == "Pixel diffused heatmap":
            show_diffusion(sa.matrix, cells[0], grid, image, alpha, cmap, shown, norm)
            return
        heat = region_map(sa.matrix, cells, grid)
        scale = scale_of(heat, norm)
        picture = overlay(mark_cells(image.resize(shown), cells, grid), heat, alpha, cmap, size=shown, scale=scale)
        st.image(
            with_colorbar(picture, cmap, scale, UNITS),
            caption=f"{tool} · {len(cells)} cells · max {heat.max():.4g}",
            width="stretch",
        )


def show_diffusion(
    matrix: np.ndarray, start: int, cells_grid, image: Image.Image, alpha: float, cmap: str, shown, norm: dict
) -> None:
    """Iterate from one cell; the final map, up to STRIP_FRAMES intermediate maps as a grid, and a GIF."""
    a, b = st.columns(2)
    iterations = a.slider("Iterations", 1, 50, 10, key="regions_iterations")
    threshold = b.slider("Threshold (fraction of range)", 0.0, 0.9, 0.2, 0.05, key="regions_threshold")
    try:
        maps = diffuse(matrix, start, cells_grid, iterations, threshold)
    except RegionInputError as exc:
        st.error(plain(str(exc)))
        return
    scales = [scale_of(m, norm) for m in maps]
    base = image.resize(shown)
    frames = [overlay(base, m, alpha, cmap, size=shown, scale=sc) for m, sc in zip(maps, scales, strict=True)]
    st.image(
        with_colorbar(frames[-1], cmap, scales[-1], UNITS),
        width="stretch",
        caption=f"Diffused from cell {start} · {iterations} iterations · threshold {threshold:g}",
    )
    picks = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(len(frames), STRIP_FRAMES))})
    thumbs = []
    for i in picks:
        thumb = frames[i].resize((128, round(128 * frames[i].height / frames[i].width)))
        label(ImageDraw.Draw(thumb), (4, 4), "start" if i == 0 else f"it {i}", "#ffffff", 14)
        thumbs.append(thumb)
    st.image(
        grid(thumbs, per_row=5),
        width="content",
        caption=f"{len(picks)} of {len(frames)} maps, iteration 0 (start) to {len(frames) - 1}",
    )
    st.download_button("Download GIF", gif_bytes(frames, 300), "stepx-diffusion.gif", "image/gif", key="regions_gif")


guarded(body)
