"""Markdown reference of the trace schema, generated from the column comments.

python -m schema.docs   # prints the section the README embeds
"""

from __future__ import annotations

from schema.tables import SCHEMA_VERSION, TABLES, column_docs
from schema.views import USER_VIEWS


def markdown() -> str:
    """One table per trace table: column, Arrow type, meaning."""
    out = [f"Trace schema version {SCHEMA_VERSION}. One Parquet file per table in each run folder.", ""]
    for table in TABLES:
        out += [f"#### `{table}`", "", USER_VIEWS.get(table, ""), "", "| column | type | meaning |", "|---|---|---|"]
        out += [f"| `{name}` | {type_} | {doc} |" for name, type_, doc in column_docs(table)]
        out.append("")
    for view in ("word_stats", "daam_maps"):
        out += [f"#### `{view}` (view)", "", USER_VIEWS[view], ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
