"""Regions and Detect & Annotate pages under AppTest (typed inputs; drawing is covered in the browser)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from analysis.detection import detect, guided_map
from analysis.regions import region_map
from store import Store

PAGES = Path(__file__).resolve().parent.parent / "dashboard" / "views"


def page(name: str, store: Path, run_id: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("STEPX_STORE", str(store))
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=120)
    at.query_params["run"] = run_id
    at.run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> list[str]:
    return [i.proto.imgs[0].caption for i in at.get("image")]


def test_regions_typed_tools_and_errors(traced_store, monkeypatch):
    root, traces = traced_store
    rid = traces[0].run["run_id"]
    at = page("regions", root, rid, monkeypatch)
    at.radio(key="regions_mode").set_value("Type").run()
    at.text_input(key="regions_px").input("0-5, 1000").run()
    sa = Store(root).self_attention(rid)
    expected = region_map(sa.matrix, [0, 1, 2, 3, 4, 5, 1000], sa.grid)
    assert captions(at) == [f"Pixel heatmap · 7 cells · max {expected.max():.4g}"]
    for bad, needle in [("0-5000", "out of range"), ("7-2", "backwards"), ("x", "not an index")]:
        at.text_input(key="regions_px").input(bad).run()
        assert not at.exception and len(at.error) == 1 and needle in at.error[0].value
    at.radio(key="regions_tool").set_value("BBox heatmap").run()
    assert captions(at)[0].startswith("BBox heatmap · 256 cells")  # 0,0,32,32 on a 64 px image, 32x32 grid
    at.text_input(key="regions_box_text").input("40,40,10,10").run()
    assert "reversed" in at.error[0].value
    at.radio(key="regions_tool").set_value("Contour heatmap").run()
    assert captions(at)[0].startswith("Contour heatmap")
    at.text_input(key="regions_poly_text").input("0,0 10,10").run()
    assert "at least 3 points" in at.error[0].value
    at.text_input(key="regions_poly_text").input("0,0 64,64 64,0 0,64").run()
    assert "crosses itself" in at.error[0].value
    at.radio(key="regions_tool").set_value("Pixel diffused heatmap").run()
    at.text_input(key="regions_diffuse").input("100").run()
    at.slider(key="regions_iterations").set_value(5).run()
    assert captions(at)[0] == "Diffused from cell 100 · 5 iterations · threshold 0.2"
    at.radio(key="regions_source").set_value("One step").run()
    assert not at.exception and any("16x16" in c.value for c in at.caption)


def test_detect_page_threshold_and_coco(traced_store, monkeypatch):
    root, traces = traced_store
    rid = traces[0].run["run_id"]
    at = page("detect", root, rid, monkeypatch)
    assert at.selectbox(key="detect_word").value == "circle"  # first object noun preselected
    otsu = captions(at)[0]
    at.radio(key="detect_threshold_kind").set_value("Manual").run()
    at.slider(key="detect_threshold").set_value(0.95).run()
    manual = captions(at)[0]
    store = Store(root)
    sa = store.self_attention(rid)
    guided = guided_map(store.word_map(rid, "circle"), sa.matrix, sa.grid)
    assert (
        otsu == f"'circle' · DAAM + self-attention · {len(detect(guided, 'circle', (64, 64), 'otsu', 0.005))} region(s)"
    )
    assert (
        manual == f"'circle' · DAAM + self-attention · {len(detect(guided, 'circle', (64, 64), 0.95, 0.005))} region(s)"
    )
    at.radio(key="detect_method").set_value("DAAM alone").run()
    assert "DAAM alone" in captions(at)[0]
    at.button(key="detect_annotate").click().run()
    assert not at.exception
    run_id, doc = at.session_state["coco"]
    from analysis.titan import coco_for_runs

    expected = coco_for_runs(store, [rid], 0.95, guided=False)  # what the page asked for: manual 0.95, DAAM alone
    assert run_id == rid and doc["annotations"] == expected["annotations"] and doc["annotations"]
    assert {c["name"] for c in doc["categories"]} <= {"circle", "square"}
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
    assert np.isfinite([a["area"] for a in doc["annotations"]]).all()
