"""SQL console: read-only SQL over the store's attention statistics, with ready questions."""

from __future__ import annotations

import csv
import io

import plotly.express as px
import streamlit as st

from dashboard.state import guarded, store
from dashboard.text import definition_list, plain
from schema import TABLES, USER_VIEWS, column_docs
from store import QueryError, Results
from store.sql import EXAMPLES

MAX_ROWS = 5000
TIMEOUT_S = 10.0


def examples_panel() -> None:
    """Buttons that put a ready question into the editor."""
    st.caption("Example questions")
    cols = st.columns(3)
    for i, (title, query) in enumerate(EXAMPLES.items()):
        if cols[i % 3].button(title, key=f"sql_example_{i}", width="stretch"):
            st.session_state["sql_query"] = query.strip()


def docs_panel() -> None:
    with st.expander("Views and columns"):
        for view, text in USER_VIEWS.items():
            st.markdown(definition_list({f"`{view}`": text}))
            if view in TABLES:  # a stored table (the derived views say what they hold above)
                st.dataframe(
                    [{"column": c, "type": t, "meaning": d} for c, t, d in column_docs(view)],
                    hide_index=True,
                )


def to_csv(res: Results) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(res.columns)
    writer.writerows(res.rows)
    return buf.getvalue()


def chart(res: Results) -> None:
    """A quick plotly chart of two chosen columns."""
    numeric = [c for i, c in enumerate(res.columns) if res.rows and isinstance(res.rows[0][i], int | float)]
    if not numeric or len(res.columns) < 2:
        return
    a, b, c = st.columns(3)
    x = a.selectbox("x", res.columns, key="sql_x")
    y = b.selectbox("y", numeric, index=len(numeric) - 1, key="sql_y")
    kind = c.selectbox("Chart", ["bar", "line", "scatter"], key="sql_chart")
    colour_choices = ["none"] + [col for col in res.columns if col not in (x, y)]
    colour = st.selectbox("Colour by", colour_choices, key="sql_colour")
    data = {col: [row[i] for row in res.rows] for i, col in enumerate(res.columns)}
    draw = {"bar": px.bar, "line": px.line, "scatter": px.scatter}[kind]
    st.plotly_chart(draw(data, x=x, y=y, color=None if colour == "none" else colour), width="stretch")


def body() -> None:
    st.title("SQL console")
    st.caption(
        f"Read-only SQL (DuckDB) over this store. One SELECT at a time; at most {MAX_ROWS} rows shown; "
        f"queries stop after {TIMEOUT_S:g} s. The console can read the store's files and nothing else."
    )
    examples_panel()
    st.session_state.setdefault("sql_query", EXAMPLES["Newest runs"].strip())
    query = st.text_area("Query", key="sql_query", height=180)
    docs_panel()
    if not st.button("Run", type="primary", key="sql_run") and "sql_result" not in st.session_state:
        return
    if st.session_state.get("sql_last") != query or "sql_result" not in st.session_state:
        try:
            st.session_state["sql_result"] = store().sql(query, max_rows=MAX_ROWS, timeout_s=TIMEOUT_S)
            st.session_state.pop("sql_error", None)
        except QueryError as exc:
            st.session_state["sql_error"] = str(exc)
            st.session_state.pop("sql_result", None)
        st.session_state["sql_last"] = query
    if "sql_error" in st.session_state:
        st.error(plain(st.session_state["sql_error"]))  # quotes the query and stored values: text, never markup
        return
    res: Results = st.session_state["sql_result"]
    st.caption(f"{len(res.rows)} rows in {res.elapsed_ms:.0f} ms")
    if res.truncated:
        st.warning(f"Only the first {MAX_ROWS} rows are shown; add a LIMIT or aggregate.")
    st.dataframe([dict(zip(res.columns, r, strict=True)) for r in res.rows], hide_index=True)
    st.download_button("Download CSV", to_csv(res), "stepx-query.csv", "text/csv", key="sql_csv")
    chart(res)


guarded(body)
