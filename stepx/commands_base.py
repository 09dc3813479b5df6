"""What every `stepx` command shares: the one-line error, the store it reads, the table printer."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from schema.layout import store_root


class CliError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def open_store(args: argparse.Namespace) -> object:
    """The read API over the store named by --store (or $STEPX_STORE)."""
    from store import Store

    return Store(store_root(args.store))


def print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    """Print query rows as an aligned table, CSV or JSON on stdout."""
    if fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    elif fmt == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1))
    else:
        cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
        widths = [min(60, max(len(row[i]) for row in cells)) for i in range(len(columns))]
        for n, row in enumerate(cells):
            print("  ".join(v[:60].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
            if n == 0:
                print("  ".join("-" * w for w in widths))
