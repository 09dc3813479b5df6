"""Read-only SQL over a store: DuckDB's own parser decides what a statement is, a timer
interrupts long queries, and a row limit returns a `truncated` flag instead of cutting silently.

The engine-level walls (external access off except the store's folders, configuration locked)
are set where the connection is opened (`analysis.store.open_sandboxed`); this layer only gives
early, friendly refusals.
"""

from __future__ import annotations

import threading
import time

import duckdb

from analysis.store import QueryError, Results

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
TIMEOUT_SETTING = "timeout_s"


def run_readonly(cur: duckdb.DuckDBPyConnection, query: str, max_rows: int, timeout_s: float) -> Results:
    """Execute one SELECT on a cursor with a time limit and a row limit."""
    text = (query or "").strip()
    if not text:
        raise QueryError("the query is empty: write one SELECT statement")
    try:
        statements = cur.extract_statements(text)
    except duckdb.Error as exc:
        raise QueryError(f"the query does not parse: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise QueryError(f"one statement at a time, please (got {len(statements)})")
    kind = statements[0].type
    if kind not in ALLOWED:
        name = str(kind).rsplit(".", 1)[-1]
        raise QueryError(
            f"only SELECT queries are allowed here; {name} statements are refused (the store is read-only)"
        )
    timer = threading.Timer(timeout_s, cur.interrupt)
    t0 = time.perf_counter()
    timer.start()
    try:
        result = cur.execute(text)
        columns = [d[0] for d in result.description or []]
        rows = result.fetchmany(max_rows + 1)
    except duckdb.InterruptException as exc:
        raise QueryError(
            f"the query ran longer than {timeout_s:g} s and was stopped; narrow it or raise "
            f"the '{TIMEOUT_SETTING}' setting"
        ) from exc
    except duckdb.PermissionException as exc:
        raise QueryError(f"refused: the console can read only this store's files ({_first_line(exc)})") from exc
    except duckdb.InvalidInputException as exc:
        raise QueryError(f"refused: {_first_line(exc)}") from exc
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {_first_line(exc)}") from exc
    finally:
        timer.cancel()
    truncated = len(rows) > max_rows
    return Results(rows[:max_rows], columns, truncated, (time.perf_counter() - t0) * 1000)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]
