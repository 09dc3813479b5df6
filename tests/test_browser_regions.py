"""Regions page in a real headless Chromium: click a pixel, draw a box and a polygon on the canvas,
and check the heatmap follows (cell counts from the geometry, a different map for each selection)."""

from __future__ import annotations

import pytest

from analysis.regions import bbox_cells, polygon_cells, validate_polygon
from dashboard.canvas import rect_to_box
from tests.browser import browser_page, dashboard, require_browser, screenshot

pytestmark = pytest.mark.browser
CANVAS = 384  # the page's display size for a square image


def result_image(page) -> tuple[str, str]:
    """(caption, image src) of the page's result heatmap."""
    fig = page.locator('[data-testid="stImage"]', has=page.locator('[data-testid="stImageCaption"]')).last
    return fig.locator('[data-testid="stImageCaption"]').inner_text(), fig.locator("img").get_attribute("src")


def wait_caption(page, prefix: str, other_than: str | None = None) -> tuple[str, str]:
    page.wait_for_function(
        """([prefix, old]) => [...document.querySelectorAll('[data-testid="stImageCaption"]')]
             .some(e => e.innerText.startsWith(prefix) && e.innerText !== old)""",
        arg=[prefix, other_than or ""],
    )
    return result_image(page)


def test_click_pixel_draw_box_and_polygon(traced_store):
    chromium = require_browser()
    root, traces = traced_store
    run_id = traces[0].run["run_id"]
    with dashboard(root) as url, browser_page(chromium) as page:
        page.set_viewport_size({"width": 1400, "height": 1400})
        page.goto(f"{url}/regions?run={run_id}")
        page.get_by_text("Query grid 32x32").wait_for()

        img = page.frame_locator('iframe[title*="streamlit_image_coordinates"]').locator("img")
        unmarked = img.get_attribute("src")
        img.click(position={"x": 40, "y": 40})
        first = wait_caption(page, "Pixel heatmap · 1 cells")
        page.wait_for_function(  # the clicked pixel is marked on the input image itself
            """(old) => { const f = document.querySelector('iframe[title*="streamlit_image_coordinates"]');
                 const i = f && f.contentDocument && f.contentDocument.querySelector('img');
                 return i && i.src !== old; }""",
            arg=unmarked,
        )
        img.click(position={"x": 330, "y": 300})
        second = wait_caption(page, "Pixel heatmap · 1 cells", other_than=first[0])
        assert second[1] != first[1]
        assert page.get_by_text("Pixel (55, 50)").count() == 1  # 330,300 of 384 px -> 64 px image
        screenshot(page, "regions-pixel")

        page.get_by_text("BBox heatmap", exact=True).click()
        canvas = page.locator("canvas.upper-canvas")
        canvas.wait_for()
        b = canvas.bounding_box()
        page.mouse.move(b["x"] + 20, b["y"] + 20)
        page.mouse.down()
        page.mouse.move(b["x"] + 120, b["y"] + 100, steps=8)
        page.mouse.up()
        box = rect_to_box({"left": 20, "top": 20, "width": 100, "height": 80}, (CANVAS, CANVAS), (64, 64))
        expected = len(bbox_cells(box, (64, 64), (32, 32)))
        boxed = wait_caption(page, f"BBox heatmap · {expected} cells")
        screenshot(page, "regions-bbox")

        page.get_by_text("Contour heatmap", exact=True).click()
        page.get_by_text("Click the corners").wait_for()
        canvas = page.locator("canvas.upper-canvas")
        b = canvas.bounding_box()
        corners = [(30, 30), (200, 40), (120, 200)]
        for x, y in corners + corners[:1]:  # the caption's instruction: click the first corner again to close
            page.mouse.click(b["x"] + x, b["y"] + y)
            page.wait_for_timeout(300)
        update = page.get_by_role("button", name="Update the app with this drawing")
        if update.count():
            update.first.click()
        on_image = validate_polygon([(x * 64 / CANVAS, y * 64 / CANVAS) for x, y in corners], (64, 64))
        expected = len(polygon_cells(on_image, (64, 64), (32, 32)))
        poly = wait_caption(page, "Contour heatmap · ")  # a heatmap, not "every point must lie inside"
        cells = int(poly[0].split(" · ")[1].split()[0])
        assert abs(cells - expected) <= 3, (cells, expected)  # Fabric's pointer may land half a pixel off a click
        assert poly[1] != boxed[1] and page.get_by_text("Polygon of 3 points").count() == 1
        assert page.locator('[data-testid="stAlert"]', has_text="must lie inside").count() == 0
        screenshot(page, "regions-polygon")
