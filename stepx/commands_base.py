"""What every `stepx` command shares: the one-line error, the store it reads, output files, the table printer."""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from schema.layout import store_root
from schema.limits import LIMITS, LimitError, check_value

LOG_NAME = "stepx.log"  # <store>/logs/stepx.log: tracebacks of unexpected errors, newest last


class CliError(Exception):
    """A failure to report as one line, with an exit status (2: bad input, 1: the store or model can't serve)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# Commands that write a store in place; an S3 store is written by `batch` and `gallery build` (jobs.batch).
LOCAL_WRITERS = ("generate", "depth", "index", "worker", "jobs", "synth", "probe")


def whole(text: str) -> int:
    """An argparse type: a whole number written in digits."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def limited(name: str) -> Callable[[str], int | float]:
    """An argparse type checked against schema.limits' table (a model's own bounds are checked later)."""

    def parse(text: str) -> int | float:
        value: int | float
        if LIMITS[name].integer:
            value = whole(text)
        else:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_value(name, value)
        except LimitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


def count(most: int) -> Callable[[str], int]:
    """A whole number from 1 to `most`."""

    def parse(text: str) -> int:
        v = whole(text)
        if not 1 <= v <= most:
            raise argparse.ArgumentTypeError(f"must be between 1 and {most:,}, got {v}")
        return v

    return parse


def checked_store(args: argparse.Namespace) -> Path:
    """The store folder named by --store (or $STEPX_STORE); CliError when it names something else.

    For an S3 store (s3://bucket/prefix) it is the local read replica (store.remote), synced first, and
    read commands get that folder as their --store; `batch` and `gallery` keep the URL to write to.
    """
    from schema.location import StoreLocationError, parse_location

    try:
        loc = parse_location(getattr(args, "store", None))
    except StoreLocationError as exc:
        raise CliError(f"stepx: {exc}", 2) from None
    if loc is not None:
        command = getattr(args, "command", "")
        if command in LOCAL_WRITERS:
            raise CliError(f"stepx {command}: writes a local store only; an S3 store is written by stepx batch", 2)
        from store.remote import local_root

        root = local_root(loc.url)
        if command not in ("batch", "gallery"):
            args.store = str(root)
        return root
    root = store_root(getattr(args, "store", None))
    if root.exists() and not root.is_dir():
        raise CliError(f"stepx: --store {root} is a file, not a store folder; give a folder (it may be new)", 2)
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"stepx: --store {root}: {parent} is a file, so no folder can be made there", 2)
            break
    return root


def open_store(args: argparse.Namespace) -> object:
    """The read API over the store named by --store (or $STEPX_STORE)."""
    from store import Store

    return Store(checked_store(args))


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error, saying which file and what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"disk full writing{where}: free some space and run the command again"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded writing{where}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}"
    if exc.errno == errno.EROFS:
        return f"read-only file system:{where}"
    if exc.errno == errno.EISDIR:
        return f"{where.strip()} is a folder, not a file"
    if exc.errno == errno.ENOTDIR:
        return f"a part of{where} is a file, not a folder"
    return f"{exc.strerror or type(exc).__name__}:{where}"


def check_out_path(path: str | Path, what: str = "--out") -> Path:
    """An output file path that can be written: not a folder, in a folder that exists (checked before work)."""
    out = Path(path)
    if not str(path).strip():
        raise CliError(f"{what} is empty; give a file name", 2)
    if out.is_dir():
        raise CliError(f"{what} {out} is a folder; give a file name", 2)
    if out.exists() and not out.is_file():  # a device or pipe: an atomic rename would replace the node itself
        raise CliError(f"{what} {out} is not a regular file (a device or a pipe); give a file name", 2)
    if not out.parent.is_dir():
        raise CliError(f"{what} {out}: the folder {out.parent} does not exist", 2)
    return out


def write_output(path: str | Path, text: str, what: str = "--out") -> Path:
    """Write a command's output file whole or not at all (temp file + rename); CliError with one line."""
    out = check_out_path(path, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        if exc.filename is None or str(exc.filename).endswith(".tmp"):
            exc.filename = str(out)
        raise CliError(f"{what}: {os_error_line(exc)}", 2 if exc.errno == errno.EISDIR else 1) from None
    return out


def log_exception(root: Path | None, argv: list[str]) -> Path:
    """Append the current exception's traceback to <store>/logs/stepx.log (else a temp-dir log); return the file."""
    entry = (
        f"--- {datetime.now(UTC).isoformat(timespec='seconds')} pid {os.getpid()} "
        f"stepx {' '.join(map(repr, argv))}\n{traceback.format_exc()}\n"
    )
    candidates = [root / "logs" / LOG_NAME] if root is not None else []
    candidates.append(Path(tempfile.gettempdir()) / f"stepx-{os.getuid()}.log")
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(entry)
            return path
        except OSError:
            continue
    return candidates[-1]


def print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    """Print query rows as an aligned table, CSV or JSON on stdout (the CLI's one printer)."""
    if fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    elif fmt == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1))
    else:
        cells = [[terminal_text(c) for c in columns]]
        cells += [["" if v is None else terminal_text(v) for v in r] for r in rows]
        widths = [min(60, max(len(row[i]) for row in cells)) for i in range(len(columns))]
        for n, row in enumerate(cells):
            print("  ".join(v[:60].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
            if n == 0:
                print("  ".join("-" * w for w in widths))


def terminal_text(value: object) -> str:
    """Text for the terminal with control and format characters escaped (ESC, C1 CSI, bidi overrides), so
    stored text (prompts, words, values quoted in error messages) can't drive the terminal."""
    text = str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
