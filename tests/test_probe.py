"""Open-vocabulary probes: the re-run reproduces the stored image bit for bit (or the probe is refused), a probe
whose text is the prompt reproduces the prompt's stored maps, probe maps are stored beside the run and queryable."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from pipeline.generate import GenerationConfig, generate_trace
from pipeline.models import load_model
from pipeline.probe import ProbeRefused, compute_probes, probe_table, write_probes
from pipeline.trace_writer import write_trace
from schema.layout import run_dir
from store import Store

ROOT = Path(__file__).resolve().parent.parent
STEPX = str(ROOT / ".venv" / "bin" / "stepx")
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A tiny-random run in a fresh store, and the model that made it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("store")
    model = load_model("tiny-random", device="cpu")
    trace = generate_trace(model, GenerationConfig(PROMPT, seed=3, steps=3, guidance=3.0))
    write_trace(root, trace)
    return root, model, trace.run["run_id"]


def _stored_final(store: Store, run_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.image(run_id)[0])).convert("RGB"))


def test_prompt_as_probe_reproduces_stored_maps(probed):
    root, model, run_id = probed
    store = Store(root)
    stored = _stored_final(store, run_id)
    result, final = compute_probes(model, store.run(run_id), stored, [PROMPT])
    assert np.array_equal(final, stored)
    write_probes(root, run_id, probe_table(run_id, result))
    store = Store(root)
    assert PROMPT in store.probes(run_id)
    for word in ("red", "circle", "left"):
        probe, stored_map = store.probe_map(run_id, PROMPT, word=word), store.word_map(run_id, word)
        r = np.corrcoef(probe.ravel(), stored_map.ravel())[0, 1]
        assert r >= 0.999, (word, r)
        np.testing.assert_allclose(probe, stored_map, rtol=1e-4, atol=1e-6)
        one = store.probe_map(run_id, PROMPT, word=word, step=1)
        np.testing.assert_allclose(one, store.word_map(run_id, word, step=1), rtol=1e-4, atol=1e-6)


def test_probe_refused_when_the_image_does_not_reproduce(probed):
    root, model, run_id = probed
    store = Store(root)
    stored = _stored_final(store, run_id).copy()
    stored[0, 0, 0] ^= 1
    with pytest.raises(ProbeRefused, match=r"doesn't reproduce .* \(1 pixels differ\)"):
        compute_probes(model, store.run(run_id), stored, ["dog"])
    run = dict(store.run(run_id), model_fingerprint="0" * 16)
    with pytest.raises(ProbeRefused, match="weights differ"):
        compute_probes(model, run, _stored_final(store, run_id), ["dog"])


def test_cli_probe_stores_maps_queryable_in_sql_and_shown_on_inspect(probed, monkeypatch):
    root, _model, run_id = probed
    out = subprocess.run(
        [STEPX, "probe", run_id, "--words", "dog, sky", "--store", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines()] == ["dog", "sky"]
    assert (run_dir(root, run_id) / "probe_maps.parquet").is_file()
    q = (
        "SELECT probe, kind, count(DISTINCT step_index) AS steps FROM probe_maps "
        "WHERE token_kind = 'word' GROUP BY ALL ORDER BY probe"
    )
    sql = subprocess.run([STEPX, "sql", q, "--store", str(root), "--format", "json"], capture_output=True, text=True)
    assert sql.returncode == 0, sql.stderr
    rows = {r["probe"]: r for r in json.loads(sql.stdout)}
    assert rows["dog"]["kind"] == "probe" and rows["dog"]["steps"] == 3 and "sky" in rows
    assert Store(root).probe_map(run_id, "dog").shape == (32, 32)

    # Inspect lists the probes apart from the prompt's words and shows the picked one's map
    monkeypatch.setenv("STEPX_STORE", str(root))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.session_state["run_id"] = run_id
    at.switch_page("views/inspect.py").run()
    assert not at.exception, at.exception
    picker = at.selectbox(key="inspect_probe")
    assert picker.options == ["none", PROMPT, "dog", "sky"]  # the prompt itself was probed above
    word_raw = [c.value for c in at.caption if c.value.startswith("Raw values")]
    picker.select("dog").run()
    assert not at.exception, at.exception
    store = Store(root)
    shown = [store.probe_map(run_id, "dog", step=t).max() for t in range(3)] + [store.probe_map(run_id, "dog").max()]
    probe_raw = [c.value for c in at.caption if c.value.startswith("Raw values")]
    assert probe_raw != word_raw and any(f"max {m:.4g} " in probe_raw[0] for m in shown)


@pytest.mark.parametrize("words", ["", " , ,"])
def test_cli_probe_without_words_is_one_line(probed, words):
    root, _model, run_id = probed
    out = subprocess.run(
        [STEPX, "probe", run_id, "--words", words, "--store", str(root)], capture_output=True, text=True
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--words" in out.stderr


@pytest.fixture(scope="module")
def test_split_rates():
    """Lone-word probe rates on the shapes model over the first noise seed of 30 test-split scenes, plain and with
    the shipped optimised tokens (fitted on training scenes only: data/models/shapes/probe_tokens.safetensors)."""
    from pipeline.models import EMBEDDED_DIR
    from pipeline.probe_tokens import TOKENS_FILE, ProbeTokens
    from shapes.probe_tune import probe_rate

    torch.set_num_threads(1)
    model = load_model("shapes", device="cpu")
    tokens = ProbeTokens.load(EMBEDDED_DIR / TOKENS_FILE)
    sources = [src for rec in tokens.meta["words"].values() for src in rec.get("sources", [])]
    assert sources and all(src.startswith("training_scene(") for src in sources)
    rates = probe_rate(model, "test", 30, tokens.for_model(model))
    print(rates)
    return rates


@pytest.mark.slow
def test_optimised_colour_probe_lands_on_its_object(test_split_rates):
    """A lone colour word ("red") with its optimised token puts its map's centroid on the object of that colour
    (measured 2026-12-01 over 60 objects
    of 30 test scenes: optimised 100%, plain 60%, the prompt's own word 100%)."""
    colour = test_split_rates["colour"]
    assert colour["objects"] >= 20 and colour["prompt_word_on_object"] >= 0.8, colour
    assert colour["optimised_words"] == 1.0, colour  # every colour probe took its optimised token
    assert colour["optimised_on_object"] >= 0.8 and colour["optimised_on_object"] > colour["on_object"], colour


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="measured 2026-12-01 over 31 objects of 30 test scenes, refined decoder: 52% (only square's token passes "
    "the held-out check; before it, 55% plain and 42% with every shape token fitted), the prompt's own word 97%: "
    "the model's image queries hardly separate shapes (a free key per layer, fitted to 20 training images of "
    "circles, centres only 55% of them on the circle; squares fit but reach 62% held out), so no token reaches 80%",
)
def test_shape_probe_lands_on_its_object(test_split_rates):
    """A lone shape word ("square") puts its map's centroid on its object, with the shipped tokens (measured
    2026-12-01 over 31 objects of 30 test scenes: 55%, plain, as no shape token passes the held-out check; fitted
    shape tokens scored 42%; validation, 43 objects of 40 scenes: plain 47%, fitted tokens 49%)."""
    shape = test_split_rates["shape"]
    assert shape["objects"] >= 20 and shape["prompt_word_on_object"] >= 0.8, shape
    assert shape["optimised_on_object"] >= 0.8, shape


def test_probe_queued_from_inspect_and_run_by_the_worker(probed, monkeypatch):
    from jobs import queue, worker

    root, _model, run_id = probed
    with pytest.raises(queue.JobError, match="probe words"):
        queue.submit(root, {"kind": "probe", "run_id": run_id, "words": []})
    with pytest.raises(queue.JobError, match="run id"):
        queue.submit(root, {"kind": "probe", "run_id": "../x", "words": ["dog"]})

    monkeypatch.setenv("STEPX_STORE", str(root))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.session_state["run_id"] = run_id
    at.switch_page("views/inspect.py").run()
    at.text_input(key="probe_words").input("cat, , cat, moon")
    at.button[[b.label for b in at.button].index("Queue probe")].click().run()
    assert not at.exception, at.exception
    assert any("Probe queued as job" in s.value for s in at.success)

    job = queue.claim(root)
    assert job.request == {"kind": "probe", "run_id": run_id, "words": ["cat", "moon"]} and job.run_id == run_id
    worker.run_job(root, job, {}, "cpu")
    done = queue.get(root, job.job_id)
    assert done.status == "done" and done.error is None, done.error
    assert {"cat", "moon"} <= set(Store(root).probes(run_id))
