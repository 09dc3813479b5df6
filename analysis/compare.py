"""Comparing runs: related runs, one word's statistics over steps in each run, matched by text."""

from __future__ import annotations

from store import Store

CURVES_SQL = """
SELECT run_id, step_index, word, avg(mass) AS mass, max(peak) AS peak,
       avg(centroid_x) AS centroid_x, avg(centroid_y) AS centroid_y, avg(entropy) AS entropy, avg(spread) AS spread
FROM word_step_stats
WHERE level = 'all' AND list_contains(?, run_id) AND lower(word) = lower(?)
GROUP BY run_id, step_index, word
ORDER BY run_id, step_index
"""

WORD_TABLE_SQL = """
SELECT run_id, word, round(avg(mass), 5) AS mean_mass, round(max(peak), 5) AS max_peak,
       round(avg(entropy), 4) AS mean_entropy, round(avg(spread), 4) AS mean_spread,
       round(last(centroid_x ORDER BY step_index), 3) AS final_centroid_x,
       round(last(centroid_y ORDER BY step_index), 3) AS final_centroid_y
FROM word_step_stats
WHERE level = 'all' AND list_contains(?, run_id) AND word_index >= 0
GROUP BY run_id, word
ORDER BY run_id, word
"""


def related_runs(store: Store, run_id: str, mode: str) -> list[str]:
    """Runs sharing the prompt (other seeds) or the seed and model (edited prompts), newest first."""
    run = store.run(run_id)
    others = [r for r in store.runs(model=run["model_name"]) if r["run_id"] != run_id]
    if mode == "same prompt":
        return [r["run_id"] for r in others if r["prompt"] == run["prompt"]]
    if mode == "same seed":
        return [r["run_id"] for r in others if r["seed"] == run["seed"] and r["prompt"] != run["prompt"]]
    raise ValueError("mode is 'same prompt' or 'same seed'")


def has_word(store: Store, run_id: str, word: str) -> bool:
    """Whether the word (case-insensitive) is in the run's prompt; Global always is."""
    if word == "Global":
        return True
    return any(w.word.casefold() == word.casefold() for w in store.words(run_id))


def word_curves(store: Store, run_ids: list[str], word: str) -> list[dict]:
    """Per run and step: the word's mass, peak, centroid, entropy and spread (combined levels)."""
    key = "<global>" if word == "Global" else word
    cur = store.cursor().execute(CURVES_SQL, [run_ids, key])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def word_table(store: Store, run_ids: list[str]) -> list[dict]:
    """Per run and word: statistics over all steps."""
    cur = store.cursor().execute(WORD_TABLE_SQL, [run_ids])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
