"""`stepx eval` end to end on the committed embedded model: held-out scenes through the real
capture, writer and store, scored against drawn and laid-out masks."""

from __future__ import annotations

import json

import pytest

from pipeline.models import EMBEDDED_DIR
from shapes.evaluate import WORD_CLASSES
from shapes.scenes import heldout_suite
from stepx.cli import main
from store import Store

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").is_file(), reason="no embedded model")


def test_stepx_eval_scores_every_owned_word_and_object(tmp_path, capsys):
    out = tmp_path / "eval.json"
    card = tmp_path / "README.md"
    card.write_text("# m\n\n<!-- stepx eval -->\nNot run yet.\n<!-- /stepx eval -->\n\n## Limits\n\nSmall.\n")
    args = ["eval", "--store", str(tmp_path / "store"), "--n", "3", "--steps", "4", "--out", str(out)]
    assert main([*args, "--card", str(card)]) == 0
    report = json.loads(out.read_text())
    suite = heldout_suite(3)
    assert report["objects"]["n"] == sum(len(s.objects) for s in suite) == 6
    owned = {
        cls: sum(1 for s in suite for word, owner in s.words if owner >= 0 and word in vocab)
        for cls, vocab in WORD_CLASSES.items()
    }
    assert owned == {"shape noun": 6, "colour adjective": 6, "position word": 6}
    for cls, n in owned.items():
        row = report["word_iou"][cls]
        assert row["n"] == n
        for key, value in row.items():
            assert 0.0 <= value <= (n if key == "n" else 1.0)
        assert 0 < row["layout_uniform"] < 0.2  # objects cover a few percent of the image
        assert row["drawn_best"] == max(row["drawn_daam"], row["drawn_otsu"])
    store = Store(tmp_path / "store")
    runs = store.runs()
    assert sorted(r["run_id"] for r in runs) == sorted(report["run_ids"])
    assert {r["gallery"] for r in runs} == {"eval-heldout"}
    assert "| shape noun | 6 |" in capsys.readouterr().out
    text = card.read_text()
    assert "Not run yet" not in text and text.count("| shape noun | 6 |") == 1
    assert "`stepx eval --n 3 --steps 4`" in text and text.endswith("## Limits\n\nSmall.\n")


def test_the_eval_section_is_added_to_a_card_without_one_and_replaced_in_place(tmp_path):
    from shapes.evaluate import EvalReport, update_card

    def report(correct: float) -> EvalReport:
        objects = {"n": 2, "present": 1.0, "colour": 1.0, "region": 1.0, "correct": correct, "shape": 0.5}
        return EvalReport("shapes", 1, 3.0, 20, {}, objects, {}, [])

    card = tmp_path / "README.md"
    card.write_text("# m\n\nIntro.\n\n## Limits\n\nSmall.\n")
    update_card(card, report(0.5), "stepx eval --n 1")
    first = card.read_text()
    assert first.index("| 50.0% | 50.0% |") < first.index("## Limits") and first.startswith("# m\n\nIntro.")
    update_card(card, report(1.0), "stepx eval --n 1")
    second = card.read_text()
    assert "| 100.0% | 50.0% |" in second and "| 50.0% | 50.0% |" not in second
    assert second.count("<!-- stepx eval -->") == 1 and second.endswith("## Limits\n\nSmall.\n")
