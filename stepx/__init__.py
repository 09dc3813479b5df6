"""StepX from Python: `stepx.record(pipe, store=...)` records a diffusers pipeline, `stepx.open_store(path)` reads.

Both load their dependencies on first use (`record` torch and diffusers, `open_store` the read side), so
`import stepx` stays cheap for the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepx.recording import RecordedRun, Recording, record
    from store import Store

__all__ = ["RecordedRun", "Recording", "Store", "open_store", "record"]


def open_store(path: str | Path | None = None) -> Store:
    """A store's read API (runs, word maps, self-attention, statistics, SQL): the one the dashboard uses."""
    from store import Store

    return Store(path)


def __getattr__(name: str) -> object:
    """`record`, `Recording`, `RecordedRun` (with torch) and `Store`, imported when first asked for."""
    if name in ("record", "Recording", "RecordedRun"):
        from stepx import recording

        return getattr(recording, name)
    if name == "Store":
        from store import Store

        return Store
    raise AttributeError(f"module 'stepx' has no attribute {name!r}")
