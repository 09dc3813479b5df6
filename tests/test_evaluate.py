"""`stepx eval` end to end on the committed embedded model: test-split scenes with several noise seeds
through the real capture, writer and store, scored against drawn and laid-out masks, with bootstrap
intervals over scenes; the model card takes test numbers only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.models import EMBEDDED_DIR
from shapes import splits
from shapes.evaluate import WORD_CLASSES, EvalReport, bootstrap_mean, update_card
from stepx.cli import main
from store import Store

needs_model = pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").is_file(), reason="no embedded model")
CARD = "# m\n\n<!-- stepx eval -->\nNot run yet.\n<!-- /stepx eval -->\n\n## Limits\n\nSmall.\n"


@needs_model
def test_stepx_eval_scores_the_test_split_with_several_seeds_per_scene(tmp_path, capsys):
    out, card = tmp_path / "eval.json", tmp_path / "README.md"
    card.write_text(CARD)
    args = ["eval", "--store", str(tmp_path / "store"), "--n", "2", "--seeds", "2", "--steps", "4", "--out", str(out)]
    assert main([*args, "--card", str(card)]) == 0
    report = json.loads(out.read_text())
    suite = splits.suite("test", 2)
    assert report["split"] == "test" and report["seeds"] == 2 and len(report["run_ids"]) == 4
    assert report["objects"]["correct"]["n"] == 2 * sum(len(s.objects) for s in suite) == 6
    assert report["images"]["clean"]["n"] == 4
    owned = {
        cls: 2 * sum(1 for s in suite for word, owner in s.words if owner >= 0 and word in vocab)
        for cls, vocab in WORD_CLASSES.items()
    }
    assert owned == {"shape noun": 6, "colour adjective": 6, "position word": 6}
    for cls, n in owned.items():
        for key, est in report["word_iou"][cls].items():
            assert est["n"] == n and 0.0 <= est["low"] <= est["value"] <= est["high"] <= 1.0, (cls, key, est)
        assert 0 < report["word_iou"][cls]["layout_uniform"]["value"] < 0.2  # objects cover a few percent
    for method in ("DAAM alone", "DAAM + self-attention"):
        det = report["detection"][method]
        assert det["regions"]["n"] == 6 and det["regions"]["value"] >= 0
    # Every run is a test-split caption generated with that scene's own test seeds.
    runs = Store(tmp_path / "store").runs()
    assert sorted(r["run_id"] for r in runs) == sorted(report["run_ids"]) and {r["gallery"] for r in runs} == {
        "eval-test"
    }
    by_prompt = {s.caption: set(splits.noise_seeds("test", i, 2)) for i, s in enumerate(suite)}
    assert {r["prompt"] for r in runs} == set(by_prompt)
    for r in runs:
        assert r["seed"] in by_prompt[r["prompt"]] and r["seed"] in splits.TEST_SEEDS
    assert "**Test split**: model shapes, 2 scenes x 2 noise seeds = 4 images" in capsys.readouterr().out
    text = card.read_text()
    assert "Not run yet" not in text and text.count("| shape noun | 6 |") == 1
    assert "Test-split numbers, measured by `stepx eval --split test --seeds 2 --n 2 --steps 4`" in text
    assert text.endswith("## Limits\n\nSmall.\n")


@needs_model
def test_stepx_eval_refuses_bad_requests_before_generating(tmp_path, capsys):
    card = tmp_path / "README.md"
    card.write_text(CARD)
    store = tmp_path / "store"
    cases = [
        (["--split", "validation", "--card", str(card)], "--card takes test-split numbers only"),
        (["--seeds", "101"], "1 to 100 noise seeds per scene"),
        (["--n", "257"], "1 to 256 scenes"),
    ]
    for extra, message in cases:
        assert main(["eval", "--store", str(store), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert card.read_text() == CARD and not any(store.rglob("*.parquet"))


def test_bootstrap_over_scenes_keeps_a_scene_together_and_is_reproducible():
    # Two scenes: one with both objects right, one with one of two. Resamples pick (a, a), (b, b) or a mix.
    est = bootstrap_mean(np.array([2.0, 1.0]), np.array([2.0, 2.0]), resamples=2000, seed=0)
    assert est == {"value": 0.75, "low": 0.5, "high": 1.0, "n": 4}
    assert bootstrap_mean(np.array([3.0, 3.0]), np.array([3.0, 3.0])) == {"value": 1.0, "low": 1.0, "high": 1.0, "n": 6}
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 4, size=40).astype(float)
    sums = rng.binomial(counts.astype(int), 0.8).astype(float)
    a, b = bootstrap_mean(sums, counts), bootstrap_mean(sums, counts)
    assert a == b and a["low"] < a["value"] < a["high"] and a["high"] - a["low"] < 0.3
    wide = bootstrap_mean(sums[:10], counts[:10])
    assert wide["high"] - wide["low"] > a["high"] - a["low"]  # fewer scenes, wider interval


def _report(correct: float, split: str = "test") -> EvalReport:
    est = {"value": correct, "low": correct / 2, "high": 1.0, "n": 2}
    objects = dict.fromkeys(("present", "colour", "region", "correct", "shape"), est)
    return EvalReport("shapes", split, 1, 2, 3.0, 20, objects, {"clean": est, "blank": est}, {}, {})


def test_the_eval_section_is_added_to_a_card_without_one_and_replaced_in_place(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# m\n\nIntro.\n\n## Limits\n\nSmall.\n")
    update_card(card, _report(0.5), "stepx eval --n 1")
    first = card.read_text()
    assert "| objects correct (present, right colour, right region) | 50.0% | 25.0% - 100.0% | >= 98.0% |" in first
    assert first.index("Test-split numbers") < first.index("## Limits") and first.startswith("# m\n\nIntro.")
    update_card(card, _report(1.0), "stepx eval --n 1")
    second = card.read_text()
    assert "| 100.0% | 50.0% - 100.0% |" in second and "| 50.0% | 25.0% - 100.0% |" not in second
    assert second.count("<!-- stepx eval -->") == 1 and second.endswith("## Limits\n\nSmall.\n")
    with pytest.raises(ValueError, match="test-split numbers only"):
        update_card(card, _report(1.0, "validation"), "stepx eval --split validation")
    assert card.read_text() == second
