"""The read side never imports torch; the pipeline never imports the dashboard."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_read_side_imports_no_torch():
    code = (
        "import sys, store, store.sql, schema.maps, pipeline.index, pipeline.trace_writer, "
        "jobs.synth, dashboard.render, dashboard.export; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# What the dashboard's process must never load (spaCy pulls thinc, and thinc pulls torch).
HEAVY = ("torch", "diffusers", "transformers", "thinc", "spacy")

PAGES_SCRIPT = """
import json, sys
from pathlib import Path
from streamlit.testing.v1 import AppTest

app = str(Path("dashboard/app.py").resolve())
at = AppTest.from_file(app, default_timeout=300)
at.run()
shown, problems = [], []


def size(node):
    return 1 + sum(size(c) for c in getattr(node, "children", {}).values())


for page in sorted(p.name for p in Path("dashboard/views").glob("*.py") if p.name != "__init__.py"):
    at.switch_page(f"views/{page}").run()
    if page == "detect.py":
        at.button(key="detect_annotate").click().run()
        shown.append(("coco", len(at.session_state["coco"][1]["annotations"])))
    problems += [f"{page}: {e.message}" for e in at.exception]
    shown.append((page, size(at.main)))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1].split(","))
loaded = [m for m in ("streamlit", "analysis.titan", "analysis.detection", "store.reader") if m in sys.modules]
print(json.dumps({"heavy": heavy, "problems": problems, "shown": shown, "loaded": loaded}))
"""


@pytest.mark.slow
def test_dashboard_pages_load_no_torch_at_runtime(tmp_path):
    """Every page of dashboard/app.py runs (Detect with a TITAN annotation done) in a fresh process over a
    synthetic store; afterwards none of torch, diffusers, transformers, thinc, spacy is in sys.modules."""
    from jobs.synth import synth_store

    synth_store(tmp_path, 2, steps=3, seed=5)
    env = {**os.environ, "STEPX_STORE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", PAGES_SCRIPT, ",".join(HEAVY)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    pages = {p.name for p in (ROOT / "dashboard" / "views").glob("*.py")} - {"__init__.py"}
    assert {name for name, _ in report["shown"]} == pages | {"coco"}
    drawn = dict(report["shown"])
    assert drawn.pop("coco") >= 1  # TITAN found at least one object from the stored nouns
    assert all(n > 3 for n in drawn.values()), drawn  # every page drew its elements
    assert len(report["loaded"]) == 4, report["loaded"]  # the check sees the modules the pages really ran
    assert report["heavy"] == [], report["heavy"]


def _imports(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_folders_import_only_downstream():
    assert not {"torch", "diffusers", "transformers", "pipeline"} & _imports("dashboard")
    assert not {"torch", "pipeline", "dashboard", "streamlit"} & _imports("analysis")
    assert not {"pipeline", "dashboard", "analysis", "torch"} & _imports("schema")
    assert "dashboard" not in _imports("pipeline")
