"""Geometry from the drawing widgets, as plain functions: canvas objects and clicks in displayed
pixels -> image pixels. Tested without Streamlit."""

from __future__ import annotations


def click_to_pixel(value: dict | None, image_size: tuple[int, int]) -> tuple[float, float] | None:
    """A streamlit-image-coordinates click (displayed pixels + displayed size) in image pixels."""
    if not value or "x" not in value:
        return None
    w, h = image_size
    shown_w = value.get("width") or w
    shown_h = value.get("height") or h
    return value["x"] * w / shown_w, value["y"] * h / shown_h


def last_object(json_data: dict | None, kinds: tuple[str, ...]) -> dict | None:
    """The most recently drawn Fabric.js object of the given types."""
    objects = (json_data or {}).get("objects") or []
    found = [o for o in objects if str(o.get("type", "")).lower() in kinds]  # Fabric 6 writes "Rect"
    return found[-1] if found else None


def rect_to_box(
    obj: dict, canvas_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """A drawn rectangle (canvas pixels, with Fabric's scale) as x1,y1,x2,y2 in image pixels, clipped."""
    sx, sy = image_size[0] / canvas_size[0], image_size[1] / canvas_size[1]
    w = obj.get("width", 0) * obj.get("scaleX", 1)
    h = obj.get("height", 0) * obj.get("scaleY", 1)
    left, top = obj.get("left", 0), obj.get("top", 0)
    x1, x2 = sorted((left, left + w))
    y1, y2 = sorted((top, top + h))
    return (max(0.0, x1 * sx), max(0.0, y1 * sy), min(image_size[0], x2 * sx), min(image_size[1], y2 * sy))


def polygon_points(obj: dict) -> list[tuple[float, float]]:
    """A Fabric polygon's corners in canvas pixels.

    Fabric keeps `points` in the coordinates they were drawn in and places the object by its box:
    `pathOffset` is the points' box centre, and the object's centre is `left`/`top` plus half its size
    (points' box plus the stroke, times the scale). So a corner is `centre + (point - pathOffset) * scale`;
    for a polygon that was never moved this is the point itself.
    """
    stroke = float(obj.get("strokeWidth", 0) or 0)
    sx, sy = float(obj.get("scaleX", 1) or 1), float(obj.get("scaleY", 1) or 1)
    off = obj.get("pathOffset") or {}
    pts = [(float(p["x"]), float(p["y"])) for p in obj.get("points", [])]
    if not pts:
        return []
    ox = float(off.get("x", (min(x for x, _ in pts) + max(x for x, _ in pts)) / 2))
    oy = float(off.get("y", (min(y for _, y in pts) + max(y for _, y in pts)) / 2))
    cx = float(obj.get("left", 0)) + (float(obj.get("width", 0)) + stroke) * sx / 2
    cy = float(obj.get("top", 0)) + (float(obj.get("height", 0)) + stroke) * sy / 2
    return [(cx + (x - ox) * sx, cy + (y - oy) * sy) for x, y in pts]


def path_to_points(obj: dict, canvas_size: tuple[int, int], image_size: tuple[int, int]) -> list[tuple[float, float]]:
    """A drawn polygon (Fabric 'path' of M/L commands, or 'polygon' points) in image pixels."""
    sx, sy = image_size[0] / canvas_size[0], image_size[1] / canvas_size[1]
    if str(obj.get("type", "")).lower() == "polygon":
        pts = polygon_points(obj)
    else:
        pts = [(cmd[1], cmd[2]) for cmd in obj.get("path", []) if cmd and cmd[0] in ("M", "L") and len(cmd) >= 3]
    out = []
    for x, y in pts:
        p = (x * sx, y * sy)
        if not out or p != out[-1]:
            out.append(p)
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return out
