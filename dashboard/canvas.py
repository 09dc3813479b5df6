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


def path_to_points(obj: dict, canvas_size: tuple[int, int], image_size: tuple[int, int]) -> list[tuple[float, float]]:
    """A drawn polygon (Fabric 'path' of M/L commands, or 'polygon' points) in image pixels."""
    sx, sy = image_size[0] / canvas_size[0], image_size[1] / canvas_size[1]
    if str(obj.get("type", "")).lower() == "polygon":
        left = obj.get("left", 0) - obj.get("pathOffset", {}).get("x", 0)
        top = obj.get("top", 0) - obj.get("pathOffset", {}).get("y", 0)
        pts = [(p["x"] + left, p["y"] + top) for p in obj.get("points", [])]
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
