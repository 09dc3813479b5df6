"""The SQL console is read-only and sandboxed: hostile queries are refused or stopped with a clear
message and the store is unchanged; example questions run; the page works under AppTest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from jobs.synth import synth_store
from store import QueryError, Store
from store.sql import EXAMPLES

HOSTILE = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_blob('/etc/shadow')",
    "SELECT * FROM read_json_auto('/etc/os-release')",
    "SELECT * FROM read_parquet('/tmp/*.parquet')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM glob('{root}/../*')",
    "SELECT * FROM read_text('{root}/../secret.txt')",
    "SELECT * FROM 'data.csv'",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "COPY runs TO '/tmp/stolen.csv'",
    "COPY runs TO '{root}/runs/evil.csv'",
    "COPY (SELECT 1) TO '{root}/index/x.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '/tmp/dump'",
    "ATTACH '/tmp/other.duckdb' AS other",
    "ATTACH ':memory:' AS m",
    "DETACH memory",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "SET threads = 1",
    "RESET lock_configuration",
    "PRAGMA enable_profiling",
    "PRAGMA threads = 64",
    "CREATE TABLE t AS SELECT * FROM runs",
    "CREATE OR REPLACE VIEW runs AS SELECT 1",
    "DROP VIEW runs",
    "INSERT INTO runs (run_id) VALUES ('x')",
    "UPDATE runs SET prompt = 'x'",
    "DELETE FROM runs",
    "ALTER VIEW runs RENAME TO r",
    "CALL pragma_version()",
    "CHECKPOINT",
    "VACUUM",
    "SELECT 1; DROP VIEW runs",
    "SELECT * FROM runs; COPY runs TO '/tmp/x.csv'",
    "",
    "   ",
    "SELEC * FROM runs",
    "SELECT count(*) FROM range(100000000000) a, range(100000000000) b",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
]


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sqlstore")
    synth_store(root, 4, steps=3, seed=2)
    (root.parent / "secret.txt").write_text("top secret")
    return root


def test_hostile_queries_refused_and_store_unchanged(store_dir):
    assert len(HOSTILE) >= 30
    before = digest(store_dir)
    store = Store(store_dir)
    for query in HOSTILE:
        text = query.format(root=store_dir)
        with pytest.raises(QueryError) as err:
            store.sql(text, timeout_s=1.0)
        message = str(err.value)
        assert "\n" not in message and len(message) < 400, message
        assert any(
            k in message for k in ("only SELECT", "one statement", "read only this store", "refused", "empty",
                                   "does not parse", "longer than", "failed")
        ), message  # fmt: skip
    assert digest(store_dir) == before
    assert not Path("/tmp/stolen.csv").exists() and not (store_dir / "runs" / "evil.csv").exists()
    assert store.sql("SELECT count(*) FROM runs").rows == [(4,)]  # still healthy afterwards


def test_timeout_names_the_setting(store_dir):
    with pytest.raises(QueryError, match="longer than 0.5 s.*timeout_s"):
        Store(store_dir).sql("SELECT count(*) FROM range(100000000000) a, range(1000) b", timeout_s=0.5)


def test_examples_run(store_dir):
    store = Store(store_dir)
    for title, query in EXAMPLES.items():
        res = store.sql(query)
        assert res.columns, title
        assert res.rows, title


def test_sql_page(store_dir, monkeypatch):
    monkeypatch.setenv("STEPX_STORE", str(store_dir))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "views" / "sql.py"))
    at.run()
    assert not at.exception
    at.button(key="sql_example_0").click().run()
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error
    assert at.dataframe[-1].value.shape[0] > 0 and "mean_spread" in list(at.dataframe[-1].value.columns)
    assert at.session_state["sql_result"].columns == ["word", "mean_spread", "runs"]
    at.text_area(key="sql_query").input("DROP VIEW runs").run()
    at.button(key="sql_run").click().run()
    assert "only SELECT" in at.error[0].value
    at.text_area(key="sql_query").input("SELECT * FROM range(9000)").run()
    at.button(key="sql_run").click().run()
    assert any("Only the first 5000 rows" in w.value for w in at.warning)
