"""StepX's own version, read from the installed package's metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

UNKNOWN = "0+unknown"  # a checkout run without `pip install -e .`


@lru_cache(maxsize=1)
def stepx_version() -> str:
    """The installed `stepx` distribution's version, or '0+unknown' when it isn't installed."""
    try:
        return version("stepx")
    except PackageNotFoundError:
        return UNKNOWN
