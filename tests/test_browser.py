"""End to end in a real headless Chromium: gallery -> inspect -> step slider -> Export All ZIP."""

from __future__ import annotations

import zipfile

import pytest

from tests.browser import browser_page, dashboard, require_browser, screenshot

pytestmark = pytest.mark.browser


def test_gallery_inspect_slider_export(traced_store, tmp_path):
    chromium = require_browser()
    root, traces = traced_store
    run = traces[0].run
    with dashboard(root) as url, browser_page(chromium) as page:
        page.goto(url)
        page.get_by_text(run["prompt"]).first.wait_for()
        screenshot(page, "gallery")
        card = page.locator('[data-testid="stColumn"]', has_text=run["prompt"]).first
        card.get_by_role("button", name="Inspect").click()
        page.get_by_text("Attention Controls").wait_for()
        page.get_by_text("Global · step 4 of 4").wait_for()
        screenshot(page, "inspect")
        thumb = page.locator('[data-testid="stSlider"]', has_text="Step").get_by_role("slider")
        thumb.focus()
        thumb.press("ArrowLeft")
        page.get_by_text("Global · step 3 of 4").wait_for()
        screenshot(page, "inspect-step-3")
        page.get_by_role("button", name="Export All").click()
        download_button = page.get_by_role("button", name="Download ZIP")
        download_button.wait_for()
        with page.expect_download() as info:
            download_button.click()
        path = tmp_path / "export.zip"
        info.value.save_as(path)
    names = zipfile.ZipFile(path).namelist()
    assert "values.csv" in names and "run.json" in names and "final.png" in names
    assert sum(n.startswith("maps/") for n in names) == 4 * 11
    assert sum(n.startswith("gifs/") for n in names) == 11
