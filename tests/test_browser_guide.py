"""The Guide's and README's screenshots, taken and annotated in a real headless Chromium on a store of
embedded-model runs, so they always show the pages as they are. Writes docs/screenshots/<page>.png (small,
numbered marks in the order the Guide lists them) and checks each page showed what its marks point at.

    STEPX_REQUIRE_BROWSER=1 .venv/bin/pytest tests/test_browser_guide.py -m "" -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dashboard.views.guide import PAGES, SCREENSHOTS
from tests.browser import annotated_screenshot, browser_page, dashboard, require_browser

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PROMPTS = [
    ("a red circle on the left and a blue square on the right", 0),
    ("a red circle on the left and a blue square on the right", 1),
    ("a green triangle at the top", 2),
]


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory) -> tuple[Path, list[str]]:
    """Three runs of the embedded shapes model (the curated gallery's model) at its defaults."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.models import load_model
    from pipeline.trace_writer import write_trace

    root = tmp_path_factory.mktemp("guide")
    model = load_model("shapes", device="cpu")
    ids = [
        write_trace(root, generate_trace(model, GenerationConfig(p, seed=s, tags=["guide"]))).run_id for p, s in PROMPTS
    ]
    return root, ids


def test_every_page_has_an_annotated_screenshot(shapes_store):
    chromium = require_browser()
    root, ids = shapes_store
    shots = {}
    with dashboard(root) as url, browser_page(chromium) as page:
        page.set_viewport_size({"width": 1400, "height": 1500})
        marks = {}

        page.goto(url)
        page.get_by_text(PROMPTS[0][0]).first.wait_for()
        marks["Gallery"] = [
            page.get_by_label("Search prompts"),
            page.locator('[data-testid="stImage"]').first,
            page.get_by_role("button", name="Inspect").first,
        ]
        shots["Gallery"] = annotated_screenshot(page, SCREENSHOTS / PAGES["Gallery"][0], marks["Gallery"])

        page.goto(f"{url}/inspect?run={ids[0]}")
        page.get_by_text("step 20 of 20").first.wait_for()
        page.locator('[data-testid="stRadio"]', has_text="Word").get_by_text("circle", exact=True).click()
        page.get_by_text("circle · step 20 of 20").first.wait_for()
        marks["Generate & Inspect"] = [
            page.locator('[data-testid="stImage"]').first,
            page.locator('[data-testid="stRadio"]', has_text="Word"),
            page.locator('[data-testid="stSlider"]', has_text="Step").first,
            page.locator('[data-testid="stSelectbox"]', has_text="Colour scale"),
            page.get_by_role("button", name="Export All"),
        ]
        shots["Generate & Inspect"] = annotated_screenshot(
            page, SCREENSHOTS / PAGES["Generate & Inspect"][0], marks["Generate & Inspect"]
        )

        page.goto(f"{url}/regions?run={ids[0]}")
        page.get_by_text("Query grid").wait_for()
        frame = page.frame_locator('iframe[title*="streamlit_image_coordinates"]')
        frame.locator("img").click(position={"x": 90, "y": 190})
        page.get_by_text("Pixel heatmap · 1 cells").first.wait_for()
        page.wait_for_timeout(1000)
        marks["Regions"] = [
            page.locator('[data-testid="stRadio"]', has_text="Tool"),
            page.locator('iframe[title*="streamlit_image_coordinates"]'),
            page.locator('[data-testid="stImage"]').last,
        ]
        shots["Regions"] = annotated_screenshot(page, SCREENSHOTS / PAGES["Regions"][0], marks["Regions"])

        page.goto(f"{url}/detect?run={ids[0]}")
        page.get_by_text("TITAN annotations").wait_for()
        page.locator('[data-testid="stImageCaption"]').first.wait_for()
        marks["Detect & Annotate"] = [
            page.locator('[data-testid="stSelectbox"]', has_text="Word"),
            page.locator('[data-testid="stImage"]').first,
            page.get_by_text("TITAN annotations"),
        ]
        shots["Detect & Annotate"] = annotated_screenshot(
            page, SCREENSHOTS / PAGES["Detect & Annotate"][0], marks["Detect & Annotate"]
        )

        page.goto(f"{url}/compare?run={ids[0]}")
        page.get_by_text("One colour scale for all runs").wait_for()
        page.locator('[data-testid="stImage"]').first.wait_for()
        marks["Compare"] = [
            page.locator('[data-testid="stMultiSelect"]', has_text="Runs"),
            page.locator('[data-testid="stImage"]').first,
            page.locator('[data-testid="stTabs"]').first,
        ]
        shots["Compare"] = annotated_screenshot(page, SCREENSHOTS / PAGES["Compare"][0], marks["Compare"])

        page.goto(f"{url}/sql")
        page.get_by_role("button", name="Run", exact=True).click()
        page.locator('[data-testid="stDataFrame"] >> visible=true').first.wait_for()
        marks["SQL console"] = [
            page.get_by_role("button").filter(has_text="Newest runs").first,
            page.get_by_label("Query"),
            page.locator('[data-testid="stDataFrame"] >> visible=true').first,
        ]
        shots["SQL console"] = annotated_screenshot(page, SCREENSHOTS / PAGES["SQL console"][0], marks["SQL console"])

        page.goto(f"{url}/guide")
        page.get_by_text("What each page answers", exact=True).wait_for()
        marks["Guide"] = [
            page.get_by_text("What each page answers", exact=True),
            page.get_by_text("Glossary", exact=True),
        ]
        shots["Guide"] = annotated_screenshot(page, SCREENSHOTS / PAGES["Guide"][0], marks["Guide"])
    for name, listed in marks.items():
        assert len(listed) == len(PAGES[name][2]), name  # one mark per numbered line in the Guide
    assert set(shots) == set(PAGES)
    for path in shots.values():
        img = Image.open(path)
        assert img.width == 960 and path.stat().st_size < 400_000
