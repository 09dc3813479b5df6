"""The read side never imports torch; the pipeline never imports the dashboard."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
