"""The house as the README draws it: the project's import graph has no cycles, each folder imports only the
folders below it, the read side never reaches torch, and big modules are named with a reason.

The graph is built from every import statement of every module of the installed packages (imports inside
functions included), so a lazy import can't slip past it. The modules actually loaded at run time are checked
by tests/test_layering.py.
"""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schema", "pipeline", "store", "analysis", "jobs", "shapes", "dashboard", "stepx", "bench")

# Which project folders each folder may import: the one way through, bottom to top.
ALLOWED = {
    "schema": set(),
    "pipeline": {"schema"},
    "store": {"schema"},
    "analysis": {"schema", "store"},
    "jobs": {"schema", "pipeline", "store", "analysis"},
    "shapes": {"schema", "pipeline", "store", "analysis"},
    "dashboard": {"schema", "store", "analysis", "jobs"},
    "stepx": {"schema", "pipeline", "store", "analysis", "jobs", "shapes"},
    "bench": {"schema", "pipeline", "store", "analysis", "jobs", "shapes", "dashboard", "stepx"},
}
# The read side: what the dashboard process loads. None of it may reach these, directly or through the project.
READ_SIDE = ("schema", "store", "analysis", "dashboard", "jobs.queue")
HEAVY = {"torch", "diffusers", "transformers", "spacy", "thinc", "accelerate"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = path
    return mods


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> third-party top-level names)."""
    mods = _modules()
    project, external = {}, {}
    for name, path in mods.items():
        deps = _imports(path)
        project[name] = {d for d in deps if d in mods and d != name}
        external[name] = {d.split(".")[0] for d in deps if d.split(".")[0] not in PACKAGES}
    return project, external


def test_every_package_is_checked():
    assert set(ALLOWED) == set(PACKAGES)
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk == set(PACKAGES), f"a top-level package the layering doesn't know: {on_disk ^ set(PACKAGES)}"


def test_no_import_cycles():
    project, _ = _graph()
    # Package __init__ modules re-export their submodules; a cycle through them is still a cycle.
    graphlib.TopologicalSorter(project).prepare()


def test_each_folder_imports_only_folders_below_it():
    project, _ = _graph()
    wrong = [
        f"{m} -> {d}"
        for m, deps in project.items()
        for d in deps
        if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert not wrong, wrong


def test_dashboard_imports_only_the_queue_of_jobs():
    project, _ = _graph()
    wrong = [
        f"{m} -> {d}"
        for m, deps in project.items()
        if m.startswith("dashboard")
        for d in deps
        if d.startswith("jobs") and d not in ("jobs", "jobs.queue")
    ]
    assert not wrong, wrong


def test_read_side_never_reaches_torch():
    project, external = _graph()
    for start in [m for m in project if m.startswith(READ_SIDE)]:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            todo += project[m]
        heavy = {(m, e) for m in seen for e in external[m] & HEAVY}
        assert not heavy, f"{start} reaches {sorted(heavy)}"


def test_big_modules_have_a_reason_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for path in _modules().values():
        lines = len(path.read_text().splitlines())
        rel = str(path.relative_to(ROOT))
        if lines > MAX_LINES:
            reason = re.search(rf"`{re.escape(rel)}`[^\n]*\S", readme)
            assert reason, f"{rel} has {lines} lines and no one-line reason in the README"


def test_readme_architecture_names_every_folder():
    section = (ROOT / "README.md").read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    diagram = section.split("```", 2)[1]
    drawn = set(re.findall(r"^ ([a-z]+)/", diagram, re.M))
    assert set(PACKAGES) <= drawn, f"folders missing from the diagram: {set(PACKAGES) - drawn}"
    assert drawn <= set(PACKAGES) | {"tests", "data"}, (
        f"the diagram draws folders that don't exist: {drawn - set(PACKAGES)}"
    )
