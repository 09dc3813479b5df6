"""StepX from Python: `stepx.record(pipe, store=...)` records a diffusers pipeline, `stepx.open_store(path)` reads.

`record` loads torch and diffusers on first use only, so the command line and the read side stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from store import Store

if TYPE_CHECKING:
    from stepx.recording import RecordedRun, Recording, record

__all__ = ["RecordedRun", "Recording", "Store", "open_store", "record"]


def open_store(path: str | Path | None = None) -> Store:
    """A store's read API (runs, word maps, self-attention, statistics, SQL): the one the dashboard uses."""
    return Store(path)


def __getattr__(name: str) -> object:
    """`record`, `Recording` and `RecordedRun`, imported (with torch) when first asked for."""
    if name in ("record", "Recording", "RecordedRun"):
        from stepx import recording

        return getattr(recording, name)
    raise AttributeError(f"module 'stepx' has no attribute {name!r}")
