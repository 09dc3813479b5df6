"""Widget geometry: clicks and Fabric.js objects in displayed pixels -> image pixels."""

from __future__ import annotations

import numpy as np
import pytest

from dashboard.canvas import click_to_pixel, last_object, path_to_points, rect_to_box


def test_click_rescales_from_displayed_size():
    assert click_to_pixel({"x": 192, "y": 96, "width": 384, "height": 384}, (64, 64)) == (32.0, 16.0)
    assert click_to_pixel({"x": 10, "y": 10, "width": 512, "height": 768}, (512, 768)) == (10.0, 10.0)
    assert click_to_pixel(None, (64, 64)) is None


def test_rect_with_fabric_scale_and_negative_drag():
    obj = {"type": "Rect", "left": 38.4, "top": 0, "width": 100, "height": 50, "scaleX": 1.5, "scaleY": 2}
    assert rect_to_box(obj, (384, 384), (64, 64)) == pytest.approx((6.4, 0.0, 31.4, 100 / 6))
    flipped = {"type": "rect", "left": 100, "top": 100, "width": -50, "height": -20}
    assert rect_to_box(flipped, (100, 100), (200, 100)) == (100.0, 80.0, 200.0, 100.0)


def test_last_object_and_paths():
    data = {"objects": [{"type": "rect"}, {"type": "Path", "path": [["M", 0, 0], ["L", 96, 0], ["L", 0, 96], ["z"]]}]}
    obj = last_object(data, ("path", "polygon"))
    assert path_to_points(obj, (96, 96), (64, 64)) == [(0.0, 0.0), (64.0, 0.0), (0.0, 64.0)]
    closed = {"type": "path", "path": [["M", 0, 0], ["L", 10, 0], ["L", 10, 10], ["L", 0, 0]]}
    assert path_to_points(closed, (10, 10), (10, 10)) == [(0, 0), (10, 0), (10, 10)]
    poly = {
        "type": "Polygon",
        "left": 10,
        "top": 10,
        "pathOffset": {"x": 5, "y": 5},
        "points": [{"x": 0, "y": 0}, {"x": 10, "y": 0}, {"x": 0, "y": 10}],
    }
    assert path_to_points(poly, (20, 20), (20, 20)) == [(5, 5), (15, 5), (5, 15)]
    assert last_object({}, ("rect",)) is None


def test_fabric_polygon_as_drawn_and_as_moved():
    """Fabric 6 keeps a polygon's points as drawn and places it by its box (left/top = corner minus half
    the stroke, pathOffset = points' box centre): the corners come back where they were clicked."""
    clicked = [(30, 30), (200, 40), (120, 200)]
    drawn = {
        "type": "Polygon",
        "left": 29,
        "top": 29,
        "width": 170,
        "height": 170,
        "strokeWidth": 2,
        "scaleX": 1,
        "scaleY": 1,
        "pathOffset": {"x": 115, "y": 115},
        "points": [{"x": x, "y": y} for x, y in clicked],
    }
    assert np.allclose(path_to_points(drawn, (384, 384), (384, 384)), clicked)
    on_image = path_to_points(drawn, (384, 384), (64, 64))
    assert np.allclose(on_image, [(5, 5), (200 / 6, 40 / 6), (20, 200 / 6)])
    moved = {**drawn, "left": 29 + 50, "top": 29 - 10}
    assert np.allclose(path_to_points(moved, (384, 384), (384, 384)), [(x + 50, y - 10) for x, y in clicked])
