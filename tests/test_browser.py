"""End to end in a real headless Chromium: the golden path (generate from the page with a real
`stepx worker` -> the new run opens -> step slider by keyboard -> Export All ZIP of display-size PNGs,
.npy arrays and 1-based step names), and prompts / URL parameters that never become markup."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.browser import browser_page, dashboard, require_browser, screenshot, worker

pytestmark = pytest.mark.browser
HOSTILE_PROMPT = "![x](http://127.0.0.1:9/p.png) a red circle"
HOSTILE_RUN = "[text](http://x)"


def test_generate_opens_slider_keys_export(traced_store, tmp_path):
    chromium = require_browser()
    root = tmp_path / "store"
    shutil.copytree(traced_store[0], root)
    prompt = "a blue square on the right"
    with dashboard(root) as url, worker(root), browser_page(chromium) as page:
        page.goto(f"{url}/inspect?run={traced_store[1][0].run['run_id']}")
        page.get_by_text("Attention Controls").wait_for()
        page.get_by_text("Generate a new image").click()
        page.get_by_label("Prompt", exact=True).fill(prompt)
        page.locator('[data-testid="stSelectbox"]', has_text="Model").click()
        page.get_by_role("option", name="Tiny random SD (tests; shows noise)", exact=True).click()
        page.get_by_text("built in-process").wait_for()  # the form has rerun for tiny-random
        steps = page.get_by_label("Steps", exact=True)
        page.wait_for_function("() => document.querySelectorAll('input[aria-label=\"Steps\"]').length === 1")
        steps.fill("4")
        steps.press("Enter")
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Generate", exact=True).click()
        # The new run opens by itself: its prompt is the page's prompt line and its caption says 4 steps.
        page.locator('[data-testid="stText"]', has_text=prompt).filter(has_not_text="Job").first.wait_for(
            timeout=240_000
        )
        page.get_by_text("step 4 of 4").first.wait_for()
        run_line = page.locator('[data-testid="stText"]', has_text="tiny-random · seed").first.inner_text()
        assert "4 steps" in run_line
        screenshot(page, "golden-new-run")
        thumb = page.locator('[data-testid="stSlider"]', has_text="Step").first.get_by_role("slider")
        thumb.focus()
        thumb.press("ArrowLeft")  # the keyboard moves the focused step slider
        page.get_by_text("step 3 of 4").first.wait_for()
        thumb.press("ArrowLeft")
        page.get_by_text("step 2 of 4").first.wait_for()
        thumb.press("ArrowRight")
        page.get_by_text("step 3 of 4").first.wait_for()
        page.get_by_role("button", name="Export All").click()
        download_button = page.get_by_role("button", name="Download ZIP")
        download_button.wait_for(timeout=180_000)
        with page.expect_download() as info:
            download_button.click()
        path = tmp_path / "export.zip"
        info.value.save_as(path)
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    assert "values.csv" in names and "run.json" in names and "final.png" in names
    pngs = [n for n in names if n.startswith("maps/")]
    assert pngs and {n.split("/")[1] for n in pngs} == {"step-001", "step-002", "step-003", "step-004"}
    for name in pngs[:3] + [n for n in names if n.startswith("overlays/")][:3]:
        assert Image.open(io.BytesIO(zf.read(name))).size == (512, 512)
    arrays = [n for n in names if n.startswith("arrays/") and n.endswith(".npy")]
    assert arrays and np.load(io.BytesIO(zf.read(arrays[0]))).shape[0] == 4
    assert zf.read("values.csv").decode().splitlines()[1].split(",")[1] == "1"  # the first step is step 1
    assert json.loads(zf.read("run.json"))["prompt"] == prompt


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory, tiny_model):
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.trace_writer import write_trace

    root = tmp_path_factory.mktemp("hostile")
    ids = []
    for prompt in (HOSTILE_PROMPT, "a blue square"):
        trace = generate_trace(tiny_model, GenerationConfig(prompt, seed=1, steps=2, guidance=2.0, tags=["x"]))
        ids.append(write_trace(root, trace).run_id)
    return root, ids


def test_prompts_and_url_parameters_never_become_links_or_images(hostile_store):
    chromium = require_browser()
    root, (hostile, other) = hostile_store
    fetched = []
    with dashboard(root) as url, browser_page(chromium) as page:
        page.on("request", lambda r: fetched.append(r.url))
        page.goto(url)
        page.get_by_text(HOSTILE_PROMPT).first.wait_for()
        visits = [
            f"inspect?run={hostile}",
            "inspect?run=[text](http://x)",
            f"regions?run={hostile}",
            "regions?run=[text](http://x)",
            f"detect?run={hostile}",
            "compare",
            "sql",
        ]
        for path in visits:
            page.goto(f"{url}/{path}")
            page.locator('[data-testid="stAppViewContainer"] h1').first.wait_for()
            page.wait_for_timeout(1500)
            bad = page.locator('img[src*="127.0.0.1:9"], a[href*="127.0.0.1:9"], a[href^="http://x"]')
            assert bad.count() == 0, path
            if "[text]" in path:
                page.get_by_text("not in this store").first.wait_for()
                assert page.get_by_text(HOSTILE_RUN, exact=True).count() >= 1  # shown as text
        page.goto(f"{url}/inspect?run={hostile}")
        page.get_by_text(HOSTILE_PROMPT).first.wait_for()
    assert not [u for u in fetched if "127.0.0.1:9/" in u or u.startswith("http://x/")]
