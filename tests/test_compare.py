"""Compare page and helpers on the fixture store of two traced runs."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from analysis.compare import has_word, related_runs, word_curves, word_table
from jobs.synth import synth_store
from store import Store

VIEW = str(Path(__file__).resolve().parent.parent / "dashboard" / "views" / "compare.py")


def test_compare_page_missing_words_difference_and_curves(traced_store, monkeypatch):
    root, traces = traced_store
    monkeypatch.setenv("STEPX_STORE", str(root))
    at = AppTest.from_file(VIEW, default_timeout=120)
    at.run()
    assert not at.exception
    assert set(at.multiselect(key="compare_runs").value) == {t.run["run_id"] for t in traces}
    # Global exists in both: same colour scale, a difference map, curves for both runs
    captions = [i.proto.imgs[0].caption for i in at.get("image")]
    assert any(c.startswith("Difference, first minus second") for c in captions)
    assert len(at.get("plotly_chart")) == 4
    at.selectbox(key="compare_word").set_value("circle").run()
    assert not at.exception
    assert any("'circle' is not in this prompt (missing)" in i.value for i in at.info)
    assert not any(c.startswith("Difference") for c in [i.proto.imgs[0].caption for i in at.get("image")])
    at.slider(key="compare_step").set_value(2).run()
    assert not at.exception and any("One colour scale" in c.value for c in at.caption)


def test_related_runs_and_curves(tmp_path):
    synth_store(tmp_path, 6, steps=3, seed=3)
    store = Store(tmp_path)
    runs = store.runs()
    rid = runs[0]["run_id"]
    assert rid not in related_runs(store, rid, "same prompt")
    curves = word_curves(store, [r["run_id"] for r in runs[:2]], "Global")
    assert {c["run_id"] for c in curves} == {r["run_id"] for r in runs[:2]} and len(curves) == 6
    assert has_word(store, rid, "Global") and not has_word(store, rid, "zebra")
    table = word_table(store, [rid])
    assert table and all(row["run_id"] == rid for row in table)
