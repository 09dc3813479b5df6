"""The dashboard as a researcher lives in it (issue 16) under AppTest: a finished generation opens, the
queue says where a job is and can cancel it, the model list stays off the rerun path, prompts are text
(never markup), long prompts say what was cut, the word picker puts content words first, the gallery
build shows its progress; plus the map-drawing functions those pages call."""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard import render
from dashboard.generate import GenerateRequest
from dashboard.words import cut_words, is_content
from jobs import queue
from schema.layout import gallery_progress_path
from schema.maps import upsample
from store import GLOBAL, Store

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
VIEWS = APP.parent / "views"
HOSTILE_PROMPT = "![x](http://127.0.0.1:9/p.png) a red circle"
HOSTILE_RUN = "[text](http://x)"


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory, tiny_model):
    """A store with a markup prompt, a prompt longer than the encoder takes, and a plain one."""
    from pipeline.generate import GenerationConfig, generate_trace
    from pipeline.trace_writer import write_trace

    root = tmp_path_factory.mktemp("odd")
    long_prompt = " ".join(["a red circle on the left and a blue square on the right"] * 8) + " zebra giraffe"
    ids = {}
    for name, prompt in [("hostile", HOSTILE_PROMPT), ("long", long_prompt), ("plain", "a blue square")]:
        trace = generate_trace(tiny_model, GenerationConfig(prompt, seed=1, steps=2, guidance=2.0, tags=["x"]))
        ids[name] = write_trace(root, trace).run_id
    return root, ids


def page(monkeypatch, root: Path, name: str | None = None, run: str | None = None) -> AppTest:
    monkeypatch.setenv("STEPX_STORE", str(root))
    at = AppTest.from_file(str(APP if name is None else VIEWS / f"{name}.py"), default_timeout=120)
    if run is not None:
        at.query_params["run"] = run
    at.run()
    assert not at.exception, at.exception
    return at


def markdown_texts(at: AppTest) -> list[str]:
    """Every string the page hands to Streamlit's markdown renderer (bodies, captions, labels, options)."""
    out = []
    for kind in ("markdown", "caption", "warning", "error", "info", "success", "title", "subheader", "header"):
        out += [str(e.value) for e in at.get(kind)]
    for r in at.get("radio"):
        out += [str(o) for o in r.options] + [str(r.label)]
    out += [img.caption for e in at.get("image") for img in e.proto.imgs]
    out += [e.proto.text for e in at.get("progress")]
    return out


def assert_no_live_markup(at: AppTest) -> None:
    for text in markdown_texts(at):
        assert "](http://127.0.0.1:9" not in text and "](http://x)" not in text, text


def test_prompts_and_url_parameters_are_text_on_every_page(odd_store, monkeypatch):
    root, ids = odd_store
    at = page(monkeypatch, root)  # Gallery
    assert HOSTILE_PROMPT in [t.value for t in at.text]
    assert_no_live_markup(at)
    for name in ("inspect", "regions", "detect", "compare", "sql"):
        at = page(monkeypatch, root, name, ids["hostile"])
        assert_no_live_markup(at)
        if name == "inspect":
            assert HOSTILE_PROMPT in [t.value for t in at.text]
        at = page(monkeypatch, root, name, HOSTILE_RUN)
        assert_no_live_markup(at)
        if name in ("inspect", "regions", "detect"):
            assert any("not in this store" in w.value for w in at.warning)
            assert HOSTILE_RUN in [c.value for c in at.code]  # shown, as code


def test_truncated_prompt_says_so_and_shows_the_cut_words(odd_store, monkeypatch):
    root, ids = odd_store
    run = Store(root).run(ids["long"])
    assert run["prompt_truncated"]
    at = page(monkeypatch, root, "inspect", ids["long"])
    assert any("longer than the text encoder takes" in w.value for w in at.warning)
    cut = next(t.value for t in at.text if t.value.startswith("Cut: "))
    assert cut.endswith("zebra giraffe")
    kept = [w.word for w in Store(root).words(ids["long"])]
    assert cut == "Cut: " + cut_words(run["prompt"], kept)
    plain = page(monkeypatch, root, "inspect", ids["plain"])
    assert not any("longer than the text encoder" in w.value for w in plain.warning)


def test_cut_words():
    assert cut_words("A Red circle, on the left", ["a", "red", "circle", ","]) == "on the left"
    assert cut_words("a red circle", ["a", "red", "circle"]) == ""
    assert cut_words("photorealistic dog", ["photorealistic"]) == "dog"


def test_word_picker_content_words_first(traced_store, monkeypatch):
    root, traces = traced_store
    rid = traces[0].run["run_id"]  # "a red circle on the left and a blue square"
    at = page(monkeypatch, root, "inspect", rid)
    words = {w.word_index: w.word for w in Store(root).words(rid)}
    radio = at.radio(key="inspect_word")
    assert radio.options[0] == "Global (all words)"
    assert list(radio.options[1:]) == ["red", "circle", "left", "blue", "square"]
    at.toggle(key="inspect_all_words").set_value(True).run()
    shown = at.radio(key="inspect_word").options[1:]
    assert len(shown) == len(words) and "a (word 1)" in shown and "and" in shown
    assert not is_content(",") and not is_content("the") and is_content("zebra")


def test_a_finished_generation_opens(traced_store, monkeypatch):
    """The keyed run selectbox used to keep the old run after the job finished."""
    root, traces = traced_store
    old, new = traces[0].run["run_id"], traces[1].run["run_id"]
    monkeypatch.setenv("STEPX_STORE", str(root))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["run_id"] = old
    at.run()
    at.switch_page("views/inspect.py").run()
    assert at.selectbox(key="inspect_run_select").value == old
    at.slider(key="inspect_step").set_value(2).run()  # the user has been working on the old run
    req = GenerateRequest("a photorealistic green triangle", "", "tiny-random", 2, 4, 3.0, 64, 64)
    job_id = queue.submit(root, asdict(req))
    at.session_state["my_jobs"] = [job_id]
    at.run()
    assert any("queued, next to run" in t.value for t in at.text)
    job = queue.claim(root)  # the worker takes it and finishes with the new run
    queue.finish(root, job, run_id=new)
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="inspect_run_select").value == new
    assert traces[1].run["prompt"] in [t.value for t in at.text]


def test_queue_position_elapsed_cancel_and_no_false_worker_warning(traced_store, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(traced_store[0], root)
    rid = traced_store[1][0].run["run_id"]
    req = asdict(GenerateRequest("a blue square", "", "tiny-random", 1, 4, 3.0, 64, 64))
    first, second = queue.submit(root, req), queue.submit(root, req)
    job = queue.claim(root)  # a worker is on `first`; its heartbeat is fresh, but no worker row was written
    assert job.job_id == first
    queue.progress(root, job, 1, 4)
    at = page(monkeypatch, root, "inspect", rid)
    at.session_state["my_jobs"] = [first, second]
    at.run()
    lines = [t.value for t in at.text]
    assert any(f"Job {first}" in t and "step 1 of 4" in t and "running" in t for t in lines), lines
    assert any(f"Job {second}" in t and "queued, next to run" in t and "waiting" in t for t in lines), lines
    assert not any("No worker is running" in w.value for w in at.warning)
    at.button(key=f"cancel_{second}").click().run()
    assert queue.get(root, second).status == "cancelled"
    at.button(key=f"cancel_{first}").click().run()
    assert queue.get(root, first).status == "cancelling"
    with queue.connect(root) as con:  # the heartbeat goes stale: now the warning is true
        con.execute("UPDATE jobs SET heartbeat_at = ? WHERE job_id = ?", (time.time() - 3600, first))
    at.run()
    assert any("No worker is running" in w.value for w in at.warning)


def test_model_list_is_not_asked_on_slider_reruns(traced_store, monkeypatch):
    import dashboard.state as state

    calls = []
    real = state.subprocess.run

    def counting(cmd, *a, **kw):
        if "models" in cmd:
            calls.append(time.monotonic())
        return real(cmd, *a, **kw)

    monkeypatch.setattr(state.subprocess, "run", counting)
    state._model_list.clear()  # a fresh server: the list has never been asked for
    root, traces = traced_store
    at = page(monkeypatch, root, "inspect", traces[0].run["run_id"])
    for step in (1, 2, 3, 4, 1):
        at.slider(key="inspect_step").set_value(step).run()
    assert calls == []  # the Generate panel is closed: nothing to list
    at.session_state["gen_panel"] = True
    at.run()
    assert len(calls) == 1 and at.text_area(key="gen_prompt") is not None
    for step in (2, 3):
        at.slider(key="inspect_step").set_value(step).run()
    assert len(calls) == 1


def test_model_list_refreshes_behind_the_page(monkeypatch):
    import dashboard.state as state

    lst = state.ModelList()
    gate = threading.Event()
    answers = itertools.chain([[{"name": "first"}]], itertools.repeat([{"name": "second"}]))

    def ask(self):
        entries = next(answers)
        if entries[0]["name"] == "second":
            gate.wait(10)
        with self._lock:
            self._entries, self._at, self._refreshing = entries, time.monotonic(), False

    monkeypatch.setattr(state.ModelList, "_ask", ask)
    assert lst.get() == [{"name": "first"}]
    monkeypatch.setattr(state, "MODELS_REFRESH_S", 0.0)
    t0 = time.monotonic()
    assert lst.get() == [{"name": "first"}]  # stale: refreshed in a thread, the caller doesn't wait
    assert time.monotonic() - t0 < 0.5
    gate.set()
    for _ in range(100):
        if lst.get() == [{"name": "second"}]:
            break
        time.sleep(0.05)
    assert lst.get() == [{"name": "second"}]


def test_model_list_logs_stderr(monkeypatch, caplog):
    import subprocess

    import dashboard.state as state

    def failing(cmd, *a, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ImportError: no module named diffusers")

    monkeypatch.setattr(state.subprocess, "run", failing)
    with caplog.at_level("WARNING", logger="stepx.dashboard"):
        assert state.ModelList().get() == []
    assert "no module named diffusers" in caplog.text


def test_gallery_shows_build_progress(traced_store, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "store"
    shutil.copytree(traced_store[0], root)
    path = gallery_progress_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path.write_text(
        json.dumps(
            {
                "gallery": "curated",
                "model": "shapes",
                "total": 30,
                "done": 2,
                "generated": 2,
                "current": "a red circle",
                "started_at": now,
                "updated_at": now,
                "finished_at": None,
                "error": None,
            }
        )
    )
    at = page(monkeypatch, root)
    bar = at.get("progress")[0].proto
    assert "2 of 30 runs" in bar.text and bar.value == int(100 * 2 / 30)
    assert "Now: a red circle" in [t.value for t in at.text]


@pytest.mark.slow
def test_gallery_build_writes_progress(tmp_path):
    from jobs.gallery import build_gallery

    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "name": "mini",
                "model": "tiny-random",
                "steps": 2,
                "entries": [{"prompt": "a red circle", "seeds": [1, 2]}],
            }
        )
    )
    seen = []
    root = tmp_path / "store"
    build_gallery(
        root,
        spec,
        "tiny-random",
        on_run=lambda i, n, r: seen.append(json.loads(gallery_progress_path(root).read_text())),
    )
    assert [(p["done"], p["total"]) for p in seen] == [(1, 2), (2, 2)]
    final = json.loads(gallery_progress_path(root).read_text())
    assert final["finished_at"] is not None and final["error"] is None and final["done"] == 2


# The drawing functions the pages call


def test_colormaps_are_matplotlibs_and_jet_is_gone():
    assert "jet" not in render.COLORMAPS
    assert {"viridis", "magma", "inferno", "cividis"} <= set(render.COLORMAPS)
    for name in ("viridis", "cividis", render.DIVERGING):
        want = (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
        assert np.array_equal(render.colorize(np.linspace(0, 1, 256), name), want)
    with pytest.raises(ValueError, match="unknown colormap"):
        render.colorize(np.zeros(2), "jet")


def test_normalisations():
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[0, 0], heat[1:, :] = 1.0, 0.1
    assert render.scale_for(heat) == render.Scale(0.0, 1.0)
    assert render.scale_for(heat, "one scale across steps", across_max=4.0) == render.Scale(0.0, 4.0)
    assert render.scale_for(heat, "fixed range", fixed=(0.05, 0.2)) == render.Scale(0.05, 0.2)
    clip = render.scale_for(heat, "percentile clip", percentile=90)
    assert clip.hi == pytest.approx(0.1) and clip.normalise(heat)[5, 5] == 1.0  # the hot pixel no longer rules
    flat = np.full((4, 4), 0.3, dtype=np.float32)
    assert render.Scale(0.0, 0.0).normalise(flat).max() == 0  # a zero map is not one flat full colour
    with pytest.raises(ValueError, match="unknown normalisation"):
        render.scale_for(heat, "max")


def test_overlay_uses_the_projects_bicubic_upsample():
    heat = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    base = Image.new("RGB", (64, 64), "white")
    shown = render.overlay(base, heat, alpha=1.0, cmap="viridis", size=(128, 128))
    want = render.colorize(np.clip(upsample(heat, 128, 128) / heat.max(), 0, 1), "viridis")
    assert np.array_equal(np.asarray(shown), want)


def test_colorbar_beside_the_map_and_grid_and_gif():
    img = Image.new("RGB", (512, 512), "black")
    both = render.with_colorbar(img, "magma", render.Scale(0.0, 0.25))
    assert both.height == 512 and both.width > 512 + 80
    bar = np.asarray(both)[:, 512 + 8 + 5]  # a column through the gradient: high (bright) at the top
    assert bar[20].sum() > bar[-20].sum()
    thumbs = [Image.new("RGB", (128, 128), (i * 4, 0, 0)) for i in range(20)]
    g = render.grid(thumbs, per_row=5)
    assert g.size == (5 * 128 + 4 * 4, 4 * 128 + 3 * 4)  # 20 thumbnails stay 128 px, in rows of 5
    import imageio.v3 as iio

    frames = [Image.new("RGB", (32, 32), (0, i * 40, 255 - i * 40)) for i in range(5)]
    back = iio.imread(render.gif_bytes(frames), extension=".gif", index=None)
    assert back.shape == (5, 32, 32, 3)
    assert np.abs(back[2].astype(int) - np.asarray(frames[2]).astype(int)).max() <= 8


def test_detection_labels_are_legible():
    from dashboard.render import font

    f = font(16)
    assert f.getbbox("circle")[3] - f.getbbox("circle")[1] >= 10  # was PIL's 11 px bitmap font
    img = Image.new("RGB", (448, 448), "white")
    from PIL import ImageDraw

    render.label(ImageDraw.Draw(img), (10, 10), "circle", "#00e5ff")
    assert (np.asarray(img)[10:30, 10:60] == 0).all(axis=2).sum() > 100  # dark backing box behind the text


def test_global_word_map_is_unchanged_by_picker(traced_store, monkeypatch):
    root, traces = traced_store
    rid = traces[0].run["run_id"]
    at = page(monkeypatch, root, "inspect", rid)
    cap = next(c.value for c in at.caption if c.value.startswith("Raw values"))
    assert f"max {Store(root).word_map(rid, GLOBAL, step=3).max():.4g}" in cap
    at.selectbox(key="inspect_norm").set_value("percentile clip").run()
    cap = next(c.value for c in at.caption if c.value.startswith("Raw values"))
    hi = float(np.percentile(Store(root).word_map(rid, GLOBAL, step=3), 99.0))
    assert f"percentile clip: 0 to {hi:.4g}" in cap


def test_sql_docs_list_the_columns_of_every_stored_table(odd_store, monkeypatch):
    """The console's "Views and columns" panel documents each stored table's columns, probes and concepts included."""
    from schema import TABLES, USER_VIEWS, column_docs

    root, _ids = odd_store
    at = page(monkeypatch, root, "sql")
    tables = [list(df.value["column"]) for df in at.dataframe if "meaning" in df.value.columns]
    for name in ("runs", "cross_attention", "probe_maps", "concept_maps"):
        assert [c for c, _t, _d in column_docs(name)] in tables, name
    assert len(tables) == len([view for view in USER_VIEWS if view in TABLES])
