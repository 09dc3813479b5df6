"""What the read side raises and returns: errors with a message meant for the user, one result shape."""

from __future__ import annotations

from dataclasses import dataclass


class StoreError(RuntimeError):
    """A read that can't be answered, with a message meant for the user."""


class RunNotFound(StoreError):
    """No run with that id in the store."""


class IndexDamaged(StoreError):
    """The store's index can't be read; `stepx index rebuild` recreates it from the run folders."""


class RunDataMissing(StoreError):
    """The run is indexed but its files are gone or unreadable."""


class WordNotFound(StoreError):
    """The word is not in the run's prompt."""


class QueryError(StoreError):
    """A SQL query was refused or failed."""


@dataclass
class Results:
    """One shape for every SQL answer."""

    rows: list[tuple]
    columns: list[str]
    truncated: bool
    elapsed_ms: float
