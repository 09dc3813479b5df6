"""Read-only SQL over a store: DuckDB's own parser decides what a statement is, a timer
interrupts long queries, and a row limit returns a `truncated` flag instead of cutting silently.

The engine-level walls (external access off except the store's folders, configuration locked)
are set where the connection is opened (`store.open_sandboxed`); this layer only gives
early, friendly refusals.
"""

from __future__ import annotations

import threading
import time

import duckdb

from store.errors import QueryError, Results

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


COLOUR_WORDS = (
    "('red', 'green', 'blue', 'yellow', 'orange', 'purple', 'pink', 'black', 'white', 'brown', 'gray', 'grey')"
)
SHAPE_WORDS = "('circle', 'square', 'triangle', 'star', 'circles', 'squares', 'triangles')"

EXAMPLES: dict[str, str] = {
    "Which words spread most across the image?": """
SELECT word, round(avg(spread), 3) AS mean_spread, count(DISTINCT run_id) AS runs
FROM word_stats
WHERE level = 'all' AND word_index >= 0
GROUP BY word
ORDER BY mean_spread DESC
LIMIT 20""",
    "At which step does each word's map stop moving?": """
WITH moves AS (
  SELECT run_id, word, step_index,
         sqrt(power(centroid_x - lag(centroid_x) OVER w, 2) + power(centroid_y - lag(centroid_y) OVER w, 2)) AS move
  FROM word_step_stats
  WHERE level = 'all' AND word_index >= 0
  WINDOW w AS (PARTITION BY run_id, word_index ORDER BY step_index)
), settled AS (
  SELECT run_id, word, coalesce(max(step_index) FILTER (WHERE move > 0.02), 0) AS last_big_move
  FROM moves GROUP BY run_id, word
)
SELECT word, round(avg(last_big_move), 1) AS mean_settling_step, count(*) AS runs
FROM settled GROUP BY word ORDER BY mean_settling_step""",
    "Colour words vs shape nouns: mean entropy per step": f"""
SELECT step_index,
       CASE WHEN lower(word) IN {COLOUR_WORDS} THEN 'colour word'
            WHEN lower(word) IN {SHAPE_WORDS} THEN 'shape noun' END AS word_class,
       round(avg(entropy), 4) AS mean_entropy
FROM word_step_stats
WHERE level = 'all' AND (lower(word) IN {COLOUR_WORDS} OR lower(word) IN {SHAPE_WORDS})
GROUP BY ALL
ORDER BY step_index, word_class""",
    "Runs where two nouns' maps overlap most": f"""
SELECT a.run_id, a.word AS first_word, b.word AS second_word,
       round(sqrt(power(a.centroid_x - b.centroid_x, 2) + power(a.centroid_y - b.centroid_y, 2)), 3)
         AS centroid_distance,
       round(a.spread + b.spread, 3) AS combined_spread
FROM word_stats a JOIN word_stats b
  ON a.run_id = b.run_id AND a.level = b.level AND a.word_index < b.word_index
WHERE a.level = 'all' AND lower(a.word) IN {SHAPE_WORDS} AND lower(b.word) IN {SHAPE_WORDS}
ORDER BY centroid_distance / nullif(combined_spread, 0)
LIMIT 20""",
    "How much attention goes to the prompt's words, per model?": """
SELECT r.model_name, round(sum(s.mass) / count(DISTINCT (s.run_id, s.step_index)), 3) AS word_mass_share,
       count(DISTINCT r.run_id) AS runs
FROM word_step_stats s JOIN runs r USING (run_id)
WHERE s.level = 'all' AND s.word_index >= 0
GROUP BY r.model_name""",
    "Newest runs": """
SELECT run_id, created_at, model_name, seed, steps, prompt FROM runs ORDER BY created_at DESC LIMIT 20""",
}
