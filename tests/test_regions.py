"""Region tools against hand-computed expectations on small synthetic attention matrices, and
their input parsers (valid, edge and invalid forms)."""

from __future__ import annotations

import numpy as np
import pytest

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
)

GRID = (4, 4)  # 16 cells on a 64x64 image: one cell = 16x16 pixels
SIZE = (64, 64)


def block_attention() -> np.ndarray:
    """Cells attend uniformly within their 2x2 quadrant of the 4x4 grid."""
    quad = np.array([(r // 2) * 2 + (c // 2) for r in range(4) for c in range(4)])
    a = (quad[:, None] == quad[None, :]).astype(np.float32)
    return a / a.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5", [5]),
        ("0-3", [0, 1, 2, 3]),
        ("100, 0-1023, 0,1,2,3", list(range(1024))),
        (" 7 ,7, 6-7 ", [6, 7]),
        ("1023", [1023]),
        ("0 - 2", [0, 1, 2]),
    ],
)
def test_parse_indices_valid(text, expected):
    assert parse_indices(text, (32, 32)) == expected


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "no indices"),
        ("1024", "out of range"),
        ("5-2", "backwards"),
        ("a", "not an index"),
        ("1.5", "not an index"),
        ("-3", "not an index"),
        ("1,,x", "not an index"),
        (",", "no indices"),
    ],
)
def test_parse_indices_invalid(text, needle):
    with pytest.raises(RegionInputError, match=needle) as err:
        parse_indices(text, (32, 32))
    assert "0-1023 on the 32x32 grid" in str(err.value)


def test_pixel_and_region_maps_hand_computed():
    a = block_attention()
    assert pixel_cell(0, 0, SIZE, GRID) == 0 and pixel_cell(63.9, 63.9, SIZE, GRID) == 15
    assert pixel_cell(20, 5, SIZE, GRID) == 1
    m = region_map(a, [pixel_cell(5, 5, SIZE, GRID)], GRID)
    expected = np.zeros(GRID)
    expected[:2, :2] = 0.25
    np.testing.assert_allclose(m, expected)
    both = region_map(a, [0, 15], GRID)  # top-left and bottom-right quadrants, each half weight
    assert both[0, 0] == pytest.approx(0.125) and both[3, 3] == pytest.approx(0.125) and both[0, 3] == 0
    with pytest.raises(RegionInputError, match="outside"):
        pixel_cell(64, 0, SIZE, GRID)


def test_bbox_cells_and_parser():
    assert bbox_cells((0, 0, 32, 32), SIZE, GRID) == [0, 1, 4, 5]
    assert bbox_cells((40, 40, 44, 44), SIZE, GRID) == [10]  # smaller than a cell: the centre's cell
    assert parse_bbox("0,0,32,32", SIZE) == (0, 0, 32, 32)
    assert parse_bbox(" 1 2 3 4 ", SIZE) == (1, 2, 3, 4)
    for bad, needle in [
        ("10,10,5,20", "reversed"),
        ("1,2,3", "4 numbers"),
        ("0,0,65,10", "leaves the image"),
        ("a,b,c,d", "not a number"),
        ("", "4 numbers"),
        ("5,5,5,9", "reversed"),
    ]:
        with pytest.raises(RegionInputError, match=needle) as err:
            parse_bbox(bad, SIZE)
        assert "x1,y1,x2,y2" in str(err.value)


def test_polygon_cells_non_square_and_parser():
    tri = parse_polygon("0,0 64,0 0,64", SIZE)
    assert parse_polygon("0 0 64 0 0 64", SIZE) == tri
    cells = polygon_cells(tri, SIZE, GRID)
    # cell centres (8+16c, 8+16r) with x + y <= 64 lie in the triangle (centres on its edge count)
    assert cells == [r * 4 + c for r in range(4) for c in range(4) if (8 + 16 * c) + (8 + 16 * r) <= 64]
    assert cells == [0, 1, 2, 3, 4, 5, 6, 8, 9, 12]
    wide = polygon_cells([(0, 0), (128, 0), (128, 32), (0, 32)], (128, 64), (2, 4))  # top half of a 128x64 image
    assert wide == [0, 1, 2, 3]
    for bad, needle in [
        ("0,0 10,10", "at least 3"),
        ("0,0 10,10 20,20", "empty"),
        ("0,0 64,64 64,0 0,64", "crosses"),
        ("0,0 10 10,10", "odd count"),
        ("0,0 70,0 0,10", "inside"),
        ("x,1 2,3 4,5", "not a number"),
    ]:
        with pytest.raises(RegionInputError, match=needle):
            parse_polygon(bad, SIZE)
    with pytest.raises(RegionInputError, match="covers no cell"):
        polygon_cells([(1, 1), (3, 1), (1, 3)], SIZE, GRID)


def test_diffuse_spreads_within_quadrant_and_sparsifies():
    a = block_attention()
    maps = diffuse(a, 0, GRID, iterations=3, threshold=0.5)
    assert len(maps) == 4 and maps[0][0, 0] == 1 and maps[0].sum() == 1
    expected = np.zeros(GRID)
    expected[:2, :2] = 0.25
    np.testing.assert_allclose(maps[1], expected, atol=1e-6)
    np.testing.assert_allclose(maps[3], expected, atol=1e-6)  # a fixed point of the block structure
    leaky = a * 0.9 + 0.1 / 16
    spread = diffuse(leaky, 0, GRID, iterations=1, threshold=0.0)[1]
    assert (spread > 0).all()
    cut = diffuse(leaky, 0, GRID, iterations=1, threshold=0.5)[1]
    assert (cut[2:, 2:] == 0).all() and (cut[:2, :2] > 0).all()
    with pytest.raises(RegionInputError):
        diffuse(a, 16, GRID)
    with pytest.raises(RegionInputError):
        diffuse(a, 0, GRID, threshold=1.5)
