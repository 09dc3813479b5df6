"""The dashboard's one door to the store: a shared `Store`, cached reads, and error guarding.

Runs are immutable, so anything keyed by run id can be cached for the life of the server.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
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
    """The folder the dashboard reads: $STEPX_STORE's, or an S3 store's local replica (synced every few seconds)."""
    from schema.location import is_remote

    if is_remote(None):
        from store.remote import local_root

        return str(local_root())
    return str(store_root())


def store() -> Store:
    """The store this server reads ($STEPX_STORE or data/store), shared by every session.

    Its cached DuckDB connection runs only the dashboard's own fixed SQL with bound parameters. A user's
    SQL never reaches it: `Store.sql` runs each query in a fresh DuckDB in its own process (store/sql.py),
    so nothing one session's query creates, replaces or sets is seen by the next query or another session.
    """
    return _store(store_path())


@st.cache_data(max_entries=1024, show_spinner=False)
def word_map(root: str, run_id: str, word: str | int, step: int | None, levels: tuple[str, ...] | None) -> np.ndarray:
    return _store(root).word_map(run_id, word, step, list(levels) if levels else None)


@st.cache_data(max_entries=256, show_spinner=False)
def concept_maps(root: str, run_id: str, step: int | None) -> tuple[list[str], np.ndarray]:
    """A FLUX.1 run's ConceptAttention maps (Store.concept_maps): (concepts, (concepts, h, w)); none: ([], empty)."""
    store = _store(root)
    return store.concept_maps(run_id, step) if store.concepts(run_id) else ([], np.zeros((0, 1, 1), np.float32))


@st.cache_data(max_entries=256, show_spinner=False)
def text_share(root: str, run_id: str, step: int | None, levels: tuple[str, ...] | None) -> np.ndarray:
    """A DiT run's text share (Store.text_share), cached like the word maps."""
    return _store(root).text_share(run_id, step, list(levels) if levels else None)


@st.cache_data(max_entries=1024, show_spinner=False)
def image_bytes(root: str, run_id: str, step: int | None) -> bytes:
    return _store(root).image(run_id, step)[0]


MODELS_REFRESH_S = 300.0  # the model list changes only when weights are added; refreshed in the background
log = logging.getLogger("stepx.dashboard")


class ModelList:
    """The model registry with availability, asked of the pipeline's CLI in a subprocess (no torch here).

    Asked once, then refreshed in a background thread when older than MODELS_REFRESH_S: a page rerun
    never waits for the subprocess except the very first time the list is needed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[dict] | None = None
        self._at = 0.0
        self._refreshing = False

    def _ask(self) -> None:
        try:
            out = subprocess.run(
                [sys.executable, "-m", "stepx.cli", "models", "--format", "json"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if out.returncode != 0:
                log.warning("`stepx models` failed (exit %s): %s", out.returncode, out.stderr.strip()[-2000:])
                entries: list[dict] = []
            else:
                if out.stderr.strip():
                    log.info("`stepx models` stderr: %s", out.stderr.strip()[-2000:])
                entries = json.loads(out.stdout)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("`stepx models` could not run: %s", exc)
            entries = []
        with self._lock:
            self._entries, self._at, self._refreshing = entries, time.monotonic(), False

    def get(self) -> list[dict]:
        """The latest list; blocks only before the first answer, refreshes stale lists behind the page."""
        with self._lock:
            entries, stale = self._entries, time.monotonic() - self._at > MODELS_REFRESH_S
            start = entries is not None and stale and not self._refreshing
            if start:
                self._refreshing = True
        if entries is None:
            self._ask()
            return self._entries or []
        if start:
            threading.Thread(target=self._ask, name="stepx-models", daemon=True).start()
        return entries


@st.cache_resource(show_spinner=False)
def _model_list() -> ModelList:
    return ModelList()


def models() -> list[dict]:
    """The model registry with availability (see ModelList)."""
    return _model_list().get()


def generators() -> list[dict]:
    return [m for m in models() if m.get("role", "generate") == "generate"]


def depth_models() -> list[dict]:
    return [m for m in models() if m.get("role") == "depth"]


def guarded(body: Callable[[], None]) -> None:
    """Run a page body; store problems and surprises become one message, never a traceback."""
    from dashboard.text import plain  # messages quote stored text (words, paths): shown as text, never markup

    try:
        body()
    except (StoreError, SchemaVersionError) as exc:
        st.error(plain(str(exc)))
    except Exception as exc:  # noqa: BLE001 - the page must not show a traceback
        st.error(f"Something went wrong: {type(exc).__name__}: {plain(str(exc))}")


def select_run(run_id: str) -> None:
    """Remember the run to open on Inspect."""
    st.session_state["run_id"] = run_id


@st.cache_resource(max_entries=32, show_spinner=False)
def self_attention(root: str, run_id: str, step: int | None) -> object:
    """A run's self-attention (aggregate or one step), shared read-only between reruns."""
    return _store(root).self_attention(run_id, step)
