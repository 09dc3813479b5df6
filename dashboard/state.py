"""The dashboard's one door to the store: a shared `Store`, cached reads, and error guarding.

Runs are immutable, so anything keyed by run id can be cached for the life of the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import streamlit as st

from schema import SchemaVersionError
from schema.layout import store_root
from store import Store, StoreError

ROOT = Path(__file__).resolve().parent.parent


@st.cache_resource(show_spinner=False)
def _store(root: str) -> Store:
    return Store(root)


def store_path() -> str:
    return str(store_root())


def store() -> Store:
    """The store this server reads ($STEPX_STORE or data/store)."""
    return _store(store_path())


@st.cache_data(max_entries=1024, show_spinner=False)
def word_map(root: str, run_id: str, word: str | int, step: int | None, levels: tuple[str, ...] | None) -> np.ndarray:
    return _store(root).word_map(run_id, word, step, list(levels) if levels else None)


@st.cache_data(max_entries=1024, show_spinner=False)
def image_bytes(root: str, run_id: str, step: int | None) -> bytes:
    return _store(root).image(run_id, step)[0]


@st.cache_data(ttl=30, show_spinner=False)
def models() -> list[dict]:
    """The model registry with availability, asked of the pipeline's CLI (no torch import here)."""
    out = subprocess.run(
        [sys.executable, "-m", "stepx.cli", "models", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        return []
    return json.loads(out.stdout)


def generators() -> list[dict]:
    return [m for m in models() if m.get("role", "generate") == "generate"]


def depth_models() -> list[dict]:
    return [m for m in models() if m.get("role") == "depth"]


def guarded(body: Callable[[], None]) -> None:
    """Run a page body; store problems and surprises become one message, never a traceback."""
    try:
        body()
    except (StoreError, SchemaVersionError) as exc:
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the page must not show a traceback
        st.error(f"Something went wrong: {type(exc).__name__}: {exc}")


def select_run(run_id: str) -> None:
    """Remember the run to open on Inspect."""
    st.session_state["run_id"] = run_id


@st.cache_resource(max_entries=32, show_spinner=False)
def self_attention(root: str, run_id: str, step: int | None) -> object:
    """A run's self-attention (aggregate or one step), shared read-only between reruns."""
    return _store(root).self_attention(run_id, step)
