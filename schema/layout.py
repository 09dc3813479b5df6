"""Where things live in a store folder; shared by the writer, the index and the readers.

<store>/runs/<run_id>/<table>.parquet   one immutable folder per complete run
<store>/tmp/                             runs being written (never read)
<store>/index/manifest.json              the index: segment files per table, run ids
<store>/index/<table>-<n>.parquet        index segments (copies of the small tables)
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE = Path(__file__).resolve().parent.parent / "data" / "store"
MANIFEST = "manifest.json"


def store_root(store: str | Path | None = None) -> Path:
    """The store folder: the argument, else $STEPX_STORE, else data/store in the checkout."""
    if store is not None:
        return Path(store)
    env = os.environ.get("STEPX_STORE")
    return Path(env) if env else DEFAULT_STORE


def runs_dir(root: Path) -> Path:
    return root / "runs"


def tmp_dir(root: Path) -> Path:
    return root / "tmp"


def index_dir(root: Path) -> Path:
    return root / "index"


def run_dir(root: Path, run_id: str) -> Path:
    return root / "runs" / run_id


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists (writers and workers record theirs)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
