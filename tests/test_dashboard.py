"""Dashboard pages under Streamlit's AppTest on a fixture store of traced tiny-random runs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboard.export import export_all
from store import GLOBAL, Store

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def app(store: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("STEPX_STORE", str(store))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def open_inspect(at: AppTest, run_id: str) -> AppTest:
    at.session_state["run_id"] = run_id
    at.switch_page("views/inspect.py").run()
    assert not at.exception, at.exception
    return at


def test_gallery_lists_filters_and_opens_runs(traced_store, monkeypatch):
    root, traces = traced_store
    at = app(root, monkeypatch)
    prompts = [t.value for t in at.text]
    assert "a red circle on the left and a blue square" in prompts
    assert "a photorealistic green triangle" in prompts
    at.text_input(key="gallery_text").input("triangle").run()
    assert [t.value for t in at.text] == ["a photorealistic green triangle"]
    assert any("1 of 2 runs" in c.value for c in at.caption)
    at.button(key=f"open_{traces[1].run['run_id']}").click().run()
    assert not at.exception
    assert at.title[0].value == "Generate & Inspect"
    assert traces[1].run["prompt"] in [t.value for t in at.text]


def test_inspect_word_step_alpha(traced_store, monkeypatch):
    root, traces = traced_store
    rid = traces[0].run["run_id"]
    at = open_inspect(app(root, monkeypatch), rid)
    store = Store(root)
    words = store.words(rid)
    labels = at.radio(key="inspect_word").options
    assert labels[0] == "Global (all words)" and "circle" in labels

    def raw_caption() -> str:
        return next(c.value for c in at.caption if c.value.startswith("Raw values"))

    def image_caption() -> str:
        return at.get("image")[0].proto.imgs[0].caption

    top = store.word_map(rid, GLOBAL, step=3)
    assert f"max {top.max():.4g}" in raw_caption() and "Global · step 4 of 4" in image_caption()
    circle = next(w.word_index for w in words if w.word == "circle")
    at.radio(key="inspect_word").set_value(circle).run()
    assert f"max {store.word_map(rid, 'circle', step=3).max():.4g}" in raw_caption()
    at.slider(key="inspect_step").set_value(2).run()
    assert "circle · step 2 of 4" in image_caption()
    assert f"max {store.word_map(rid, 'circle', step=1).max():.4g}" in raw_caption()
    before = at.get("image")[0].proto.imgs[0].url
    at.slider(key="inspect_alpha").set_value(0.1).run()
    assert not at.exception and at.get("image")[0].proto.imgs[0].url != before
    at.toggle(key="inspect_all_steps").set_value(True).run()
    assert "all steps (sum)" in image_caption()
    assert f"max {store.word_map(rid, 'circle').max():.4g}" in raw_caption()
    at.multiselect(key="inspect_levels").set_value(["16x16"]).run()
    assert "levels 16x16" in raw_caption()
    at.button(key="make_gif").click().run()
    assert not at.exception and at.session_state["gif"][1][:6] == b"GIF89a"
    at.button(key="make_zip").click().run()
    assert not at.exception and zipfile.ZipFile(io.BytesIO(at.session_state["zip"][1])).testzip() is None


def test_export_all_zip_matches_store(traced_store):
    root, traces = traced_store
    rid = traces[0].run["run_id"]
    store = Store(root)
    zf = zipfile.ZipFile(io.BytesIO(export_all(store, rid)))
    names = set(zf.namelist())
    tokens, maps = store.token_maps(rid)
    assert len(tokens) == 11 and maps.shape == (4, 11, 32, 32)
    pngs = {n for n in names if n.startswith("maps/")}
    assert (
        len(pngs) == 4 * 11
        and "maps/step-001/token-03-circle.png" in pngs
        and "maps/step-004/token-03-circle.png" in pngs
    )
    assert not any("step-000" in n for n in names)  # steps are 1-based, as on the slider
    assert len({n for n in names if n.startswith("overlays/")}) == 4 * 11
    for name in ("maps/step-002/token-03-circle.png", "overlays/step-002/token-03-circle.png"):
        assert _png(zf.read(name)).size == (512, 512)  # the display size, not the 64 px image
    assert {n for n in names if n.startswith("gifs/")} == {f"gifs/token-{n}" for n in _gif_names(store, rid)}
    assert {"values.csv", "run.json", "final.png", "README.txt"} <= names
    arr = np.load(io.BytesIO(zf.read("arrays/token-03-circle.npy")))
    assert arr.shape == (4, 32, 32) and arr.dtype == np.float32
    assert np.allclose(arr, maps[:, tokens.index(3)])
    # The colour PNG is the bicubic-upsampled value (schema.maps.upsample) through the colormap.
    from dashboard.render import colorize
    from schema.maps import upsample

    circle = maps[:, tokens.index(3)]
    want = colorize(np.clip(upsample(circle[1], 512, 512) / circle.max(), 0, 1), "inferno")
    assert np.array_equal(np.asarray(_png(zf.read("maps/step-002/token-03-circle.png"))), want)
    rows = list(csv.DictReader(io.StringIO(zf.read("values.csv").decode())))
    assert len(rows) == 4 * 11 * 32 * 32 and {r["step"] for r in rows} == {"1", "2", "3", "4"}
    pick = [r for r in rows if r["step"] == "3" and r["token_index"] == "3" and r["y"] == "5" and r["x"] == "7"]
    assert len(pick) == 1 and pick[0]["word"] == "circle"
    assert abs(float(pick[0]["value"]) - maps[2, tokens.index(3), 5, 7]) < 1e-5 * max(1, maps.max())
    readme = zf.read("README.txt").decode()
    for column in ("run_id", "step", "token_index", "word", "y, x", "value"):
        assert column in readme
    assert "1 = first (noisiest)" in readme
    meta = json.loads(zf.read("run.json"))
    assert meta["run_id"] == rid and meta["prompt"] == traces[0].run["prompt"]
    assert np.array_equal(np.asarray(_png(zf.read("final.png"))), np.asarray(traces[0].final))


def test_coco_zip_holds_its_images(traced_store):
    from analysis.titan import coco_for_runs
    from dashboard.export import coco_zip

    root, traces = traced_store
    store = Store(root)
    rid = traces[0].run["run_id"]
    zf = zipfile.ZipFile(io.BytesIO(coco_zip(store, coco_for_runs(store, [rid]))))
    doc = json.loads(zf.read("annotations.json"))
    for image in doc["images"]:
        assert zf.read(f"images/{image['file_name']}") == store.image(image["stepx_run_id"])[0]


def _gif_names(store: Store, rid: str) -> list[str]:
    from dashboard.export import _slug

    return [f"{t['token_index']:02d}-{_slug(t['token_text'])}.gif" for t in store.tokens(rid) if t["has_map"]]


def _png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_guide_page(traced_store, monkeypatch):
    at = app(traced_store[0], monkeypatch)
    at.switch_page("views/guide.py").run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    for term in ("Cross-attention", "Self-attention", "Denoising step", "Global attention", "Overlay alpha"):
        assert term in text


def test_empty_store_is_friendly(tmp_path, monkeypatch):
    at = app(tmp_path, monkeypatch)
    assert any("no runs yet" in i.value for i in at.info)
    at.switch_page("views/inspect.py").run()
    assert not at.exception and any("No runs yet" in i.value for i in at.info)


def test_deleted_run_files_and_unknown_word(traced_store, tmp_path, monkeypatch):
    root, traces = traced_store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    rid = traces[0].run["run_id"]
    shutil.rmtree(copy / "runs" / rid)
    at = app(copy, monkeypatch)
    assert any("image missing" in w.value for w in at.warning)
    at = open_inspect(at, rid)
    assert any(rid in e.value.replace("\\", "") and "missing" in e.value for e in at.error)  # shown escaped
    monkeypatch.setenv("STEPX_STORE", str(copy))
    fresh = AppTest.from_file(str(Path(APP).parent / "views" / "inspect.py"), default_timeout=120)
    fresh.query_params["run"] = traces[1].run["run_id"]
    fresh.query_params["word"] = "dog"
    fresh.run()
    assert not fresh.exception
    assert any("not a word of this prompt" in w.value for w in fresh.warning)
    assert "dog" in [c.value for c in fresh.code]  # the asked word, shown as text
    assert "Global" in fresh.get("image")[0].proto.imgs[0].caption


def test_newer_schema_store_is_refused_politely(traced_store, tmp_path, monkeypatch):
    copy = tmp_path / "store"
    shutil.copytree(traced_store[0], copy)
    manifest = copy / "index" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["schema_version"] = "9.0"
    manifest.write_text(json.dumps(data))
    at = app(copy, monkeypatch)
    assert any("schema 9.0" in e.value.replace("\\", "") for e in at.error)  # shown escaped
