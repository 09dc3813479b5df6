"""Attacks found by trying StepX as a hostile user would (issue 14), one test per class: damage put where the
store's files go (FIFOs, devices, symlinks out of the store, wrong column types, malformed versions), markup in
every stored string the dashboard shows, and hostile queue rows. Each asserts the one-line outcome at the
level where it broke (the files, the engine, the runtime)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.synth import synth_store
from pipeline.index import read_manifest, rebuild_index, update_index
from schema import SchemaVersionError
from schema.layout import ManifestError
from store import Store
from store.errors import IndexDamaged, RunDataMissing, StoreError


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("attack-base")
    synth_store(root, 2, steps=2)
    return root


@pytest.fixture
def store_copy(base_store, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(base_store, root, symlinks=True)
    return root


def manifest(root: Path) -> dict:
    return json.loads((root / "index" / "manifest.json").read_text())


def segment(root: Path, table: str) -> Path:
    return root / "index" / manifest(root)["segments"][table][0]["file"]


def one_line_damage(call) -> str:
    """The call raises IndexDamaged with one line that says to rebuild; returns the line."""
    with pytest.raises(IndexDamaged) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and "stepx index rebuild" in text
    return text


def within(seconds: float, fn) -> object:
    """fn's result, failing (instead of hanging the suite) when it takes longer than `seconds`."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge"])
def test_manifest_that_is_no_regular_file_is_damage_not_a_hang(store_copy, kind):
    path = store_copy / "index" / "manifest.json"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block every command forever
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")  # reading it would fill memory
    else:
        with open(path, "wb") as fh:
            fh.truncate((256 << 20) + 1)  # sparse: past the manifest size limit without using the disk
    text = within(20, lambda: one_line_damage(lambda: Store(store_copy).runs()))
    assert "manifest.json" in text
    with pytest.raises(ManifestError):
        within(20, lambda: read_manifest(store_copy))
    report = within(60, lambda: rebuild_index(store_copy))
    assert report.runs == 2 and len(Store(store_copy).runs()) == 2


def test_segment_with_wrong_column_types_is_damage(store_copy):
    seg = segment(store_copy, "tokens")
    t = pq.read_table(seg)
    i = t.schema.get_field_index("token_index")
    pq.write_table(t.set_column(i, "token_index", pa.array([str(v) for v in t.column(i).to_pylist()])), seg)
    run_id = manifest(store_copy)["run_ids"][0]
    text = one_line_damage(lambda: Store(store_copy).word_map(run_id, "Global"))
    assert "token_index" in text
    assert update_index(store_copy) and Store(store_copy).word_map(run_id, "Global").size


def test_runs_segment_with_missing_run_ids_is_damage(store_copy):
    seg = segment(store_copy, "runs")
    t = pq.read_table(seg)
    pq.write_table(t.set_column(0, "run_id", pa.array([None] * t.num_rows, pa.string())), seg)
    one_line_damage(lambda: Store(store_copy).runs())
    one_line_damage(lambda: Store(store_copy).sql("SELECT count(*) FROM runs"))
    rebuild_index(store_copy)
    assert len(Store(store_copy).runs()) == 2


@pytest.mark.parametrize("version", ["", "99.x.\nforged line", "1.6; DROP"])
def test_malformed_schema_versions_are_one_line(store_copy, version):
    m = manifest(store_copy)
    m["schema_version"] = version
    (store_copy / "index" / "manifest.json").write_text(json.dumps(m))
    one_line_damage(lambda: Store(store_copy).runs())
    run_id = m["run_ids"][0]
    path = store_copy / "runs" / run_id / "images.parquet"
    t = pq.read_table(path)
    pq.write_table(t.replace_schema_metadata({b"stepx.schema_version": version.encode()}), path)
    rebuild_index(store_copy)
    with pytest.raises(SchemaVersionError) as err:
        Store(store_copy).image(run_id)
    assert "\n" not in str(err.value) and "malformed" in str(err.value)


def test_run_file_with_wrong_step_type_is_missing_data(store_copy):
    run_id = manifest(store_copy)["run_ids"][0]
    for table in ("images", "self_attention"):
        path = store_copy / "runs" / run_id / f"{table}.parquet"
        t = pq.read_table(path)
        i = t.schema.get_field_index("step_index")
        t = t.set_column(i, "step_index", pa.array([str(v) for v in t.column(i).to_pylist()]))
        pq.write_table(t, path)
    s = Store(store_copy)
    for call in (lambda: s.image(run_id), lambda: s.self_attention(run_id)):
        with pytest.raises(RunDataMissing, match="step_index"):
            call()


def test_symlinks_and_fifos_out_of_the_store_are_never_read(store_copy, tmp_path):
    outside = tmp_path / "outside"
    run_id, other = manifest(store_copy)["run_ids"][:2]
    shutil.move(store_copy / "runs" / run_id, outside)  # the run folder now lives outside the store
    (store_copy / "runs" / run_id).symlink_to(outside)
    fifo = store_copy / "runs" / other / "images.parquet"
    fifo.unlink()
    os.mkfifo(fifo)  # a reader opening it would block forever
    s = Store(store_copy)
    assert {r["run_id"] for r in within(20, s.runs)} == {run_id, other}  # listing needs no run file
    with pytest.raises(RunDataMissing, match="not a regular file"):
        within(20, lambda: s.image(other))
    with pytest.raises(RunDataMissing, match="not a regular file"):
        within(20, lambda: s.image(run_id))  # through the symlinked folder: refused, not read
    res = within(60, lambda: s.sql("SELECT count(DISTINCT run_id) FROM images"))
    assert res.rows == [(0,)]  # neither run's images: one is a FIFO, one is outside the store
    seg = segment(store_copy, "tokens")
    shutil.copy(seg, tmp_path / "seg.parquet")
    seg.unlink()
    seg.symlink_to(tmp_path / "seg.parquet")
    one_line_damage(lambda: Store(store_copy).runs())


# -- markup in every stored string the dashboard shows ------------------------------------------------------

MARKUP = [
    "<img src=x onerror=alert(1)>",
    "[x](javascript:alert(1))",
    "![x](http://127.0.0.1:9/p.png)",
    ":red[RED]",
    "$\\frac{1}{2}$",
    "**bold**",
    "www.example.com",
]
# Markup that would render: one of the payloads with its first special character not backslash-escaped.
LIVE = re.compile(
    r"(?<!\\)<img|(?<!\\)\]\((javascript|http)|(?<!\\):red(?<!\\)\[|(?<!\\)\$\\frac|(?<!\\)\*(?<!\\)\*bold"
    r"|(?<![\\])www(?<!\\)\.example"
)
VIEWS = Path(__file__).resolve().parent.parent / "dashboard" / "views"


@pytest.fixture(scope="module")
def markup_store(tmp_path_factory) -> tuple[Path, str]:
    """Two runs whose prompt, words, tags, model and gallery names are markup; a damaged gallery progress file."""
    from datetime import UTC, datetime

    import numpy as np

    from jobs.synth import synth_trace
    from pipeline.trace import TokenInfo
    from pipeline.trace_writer import build_tables, write_tables
    from schema.layout import gallery_progress_path

    root = tmp_path_factory.mktemp("markup")
    rng = np.random.default_rng(0)
    for k in range(2):
        tr = synth_trace(rng, datetime(2026, 1, 1, 0, 0, k, tzinfo=UTC), steps=2)
        tr.run.update(prompt=" ".join(MARKUP), tags=list(MARKUP), model_name=MARKUP[2], gallery=MARKUP[0])
        words = [MARKUP[i % len(MARKUP)] for i in range(len(tr.tokens) - 2)]
        tr.tokens[1:-1] = [TokenInfo(i + 1, 1000 + i, w, i, w, "word", True, w, False) for i, w in enumerate(words)]
        write_tables(root, tr.run["run_id"], build_tables(tr), 2, index=False)
    update_index(root)
    progress = gallery_progress_path(root)
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text(json.dumps({"gallery": MARKUP[1], "total": 5, "done": "y", "error": MARKUP[2]}))
    return root, Store(root).runs()[0]["run_id"]


def shown_as_markdown(at) -> list[str]:
    """Every string a page hands to Streamlit's markdown renderer: bodies, alerts, captions, labels, options."""
    out = []
    for kind in ("markdown", "caption", "warning", "error", "info", "success", "title", "subheader", "header"):
        out += [str(e.value) for e in at.get(kind)]
    for r in at.get("radio"):
        out += [str(o) for o in r.options] + [str(r.label)]
    out += [img.caption for e in at.get("image") for img in e.proto.imgs]
    out += [e.proto.text for e in at.get("progress")]
    for kind in ("selectbox", "multiselect", "toggle", "slider", "button", "text_input", "expander"):
        out += [str(getattr(e.proto, a, "")) for e in at.get(kind) for a in ("label", "help")]
    return out


@pytest.mark.parametrize("page", ["gallery", "inspect", "regions", "detect", "compare", "sql"])
def test_markup_in_stored_text_and_urls_is_never_rendered(markup_store, monkeypatch, page):
    from streamlit.testing.v1 import AppTest

    root, run_id = markup_store
    monkeypatch.setenv("STEPX_STORE", str(root))
    for params in ({"run": run_id, "word": MARKUP[2], "step": MARKUP[0]}, {"run": MARKUP[1], "word": MARKUP[3]}):
        at = AppTest.from_file(str(VIEWS / f"{page}.py"), default_timeout=120)
        for k, v in params.items():
            at.query_params[k] = v
        at.run()
        assert not at.exception, at.exception  # the damaged progress file included
        live = [t for t in shown_as_markdown(at) if LIVE.search(t)]
        assert not live, live


def test_page_errors_quoting_stored_text_are_text(monkeypatch):
    from streamlit.testing.v1 import AppTest

    def page() -> None:
        from dashboard.state import guarded
        from store.errors import WordNotFound

        def body() -> None:
            raise WordNotFound("'dog' is not a word of this prompt; its words are: ![x](http://127.0.0.1:9/p.png)")

        guarded(body)

    at = AppTest.from_function(page).run()
    assert not at.exception and len(at.error) == 1
    assert not LIVE.search(at.error[0].value) and "127" in at.error[0].value


# -- the queue ----------------------------------------------------------------------------------------------


def _deep(n: int) -> dict:
    d: dict = {}
    for _ in range(n):
        d = {"a": d}
    return d


def _row_text(request: dict) -> str:
    """The request as JSON text, as a hand-edited row would hold it (nesting too deep for json.dumps written out)."""
    try:
        return json.dumps(request)
    except RecursionError:
        return '{"prompt": "a", "model": "shapes", "extra": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001


HOSTILE_REQUESTS = [
    {"prompt": "a", "model": "shapes", "tags": ["x" * 10_000_000]},
    {"prompt": "a", "model": "shapes", "tags": ["x"] * 100_000},
    {"prompt": "a", "model": "shapes", "tags": ["\x00<img src=x>"]},
    {"prompt": "a", "model": "shapes", "tags": "not a list"},
    {"prompt": "a", "model": "shapes", "extra": _deep(100_000)},  # json.dumps would raise RecursionError
    {"prompt": "a", "model": "shapes", "blob": "x" * 5_000_000},
    {"prompt": "a", "model": "shapes", "run_id": "../../x"},  # the queue sets the run id itself
    {"kind": "probe", "run_id": "20260101-000000-abcdef", "words": ["dog"] * 10_000},
    {"kind": "depth", "run_id": "20260101-000000-abcdef", "extra": 1},
]


@pytest.mark.parametrize("request_", HOSTILE_REQUESTS, ids=range(len(HOSTILE_REQUESTS)))
def test_hostile_requests_are_refused_in_one_line_and_fail_alone_when_written_by_hand(tmp_path, request_):
    from jobs import queue

    with pytest.raises(queue.JobError) as err:
        queue.submit(tmp_path, request_)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200
    good = queue.submit(tmp_path, {"prompt": "a red circle", "model": "shapes", "steps": 2})
    with queue.connect(tmp_path) as con:  # the same request written straight into the queue, ahead of the good one
        con.execute(
            "INSERT INTO jobs (job_id, created_at, status, request, run_id) VALUES (0, 0, 'queued', ?, ?)",
            (_row_text(request_), "x"),
        )
    claimed = queue.claim(tmp_path)
    assert claimed is not None and claimed.job_id == good
    bad = queue.get(tmp_path, 0)
    assert bad.status == "failed" and bad.error.startswith("unusable job")


def test_job_ids_out_of_range_are_no_job(tmp_path):
    from jobs import queue

    queue.submit(tmp_path, {"prompt": "a red circle", "model": "shapes"})
    for job_id in (2**70, -(2**70), 999):
        assert queue.get(tmp_path, job_id) is None
        with pytest.raises(queue.JobError, match="no job"):
            queue.cancel(tmp_path, job_id)


# -- the Python API (stepx.open_store) with hostile arguments --------------------------------------------------

HOSTILE_IDS = [
    "../../x",
    "",
    None,
    123,
    "a" * 1000,
    "x\x00",
    ".",
    "..",
    Path("/etc"),
    b"abc",
    "/etc/passwd",
    ["x"],
    1.5,
]


def test_every_run_id_taking_function_refuses_hostile_ids_in_one_line(base_store):
    import inspect

    import stepx

    s = stepx.open_store(base_store)
    extra = {"resolve_word": ["Global"], "word_map": ["Global"], "probe_map": ["x"], "cross_maps": [[1]]}
    names = [n for n, f in inspect.getmembers(Store, inspect.isfunction) if not n.startswith("_")]
    checked = 0
    for name in names:
        method = getattr(s, name)
        if list(inspect.signature(method).parameters)[:1] != ["run_id"]:
            continue
        for run_id in HOSTILE_IDS:
            with pytest.raises(StoreError) as err:
                method(run_id, *extra.get(name, []))
            assert "\n" not in str(err.value) and len(str(err.value)) < 300, (name, run_id)
            checked += 1
    assert checked >= 15 * len(HOSTILE_IDS)  # every per-run read: run, tokens, maps, images, depth, probes, ...


def test_hostile_arguments_are_one_line_store_errors(base_store):
    s = Store(base_store)
    run_id = s.runs()[0]["run_id"]
    calls = [
        lambda: s.word_map(run_id, None),
        lambda: s.word_map(run_id, 1.5),
        lambda: s.word_map(run_id, "Global", step="x"),
        lambda: s.word_map(run_id, "Global", step=True),
        lambda: s.word_map(run_id, "Global", step=10**30),
        lambda: s.image(run_id, step="x"),
        lambda: s.self_attention(run_id, step=10**30),
        lambda: s.runs(limit=-1),
        lambda: s.runs(limit=10**30),
        lambda: s.runs(tag=["x"]),
        lambda: s.cross_maps(run_id, ["x"]),
        lambda: s.cross_maps(run_id, [10**30]),
    ]
    for call in calls:
        with pytest.raises(StoreError) as err:
            call()
        assert "\n" not in str(err.value)
    assert s.runs(text="%' OR 1=1 --") == []  # bound as a parameter: a filter, not SQL


def test_writers_never_follow_a_run_folder_symlinked_out_of_the_store(store_copy, tmp_path):
    import numpy as np

    from pipeline.depth import write_depth
    from pipeline.index import is_indexed

    run_id = manifest(store_copy)["run_ids"][0]
    outside = tmp_path / "outside"
    shutil.move(store_copy / "runs" / run_id, outside)
    (store_copy / "runs" / run_id).symlink_to(outside)  # still listed by the manifest
    before = sorted(p.name for p in outside.iterdir())
    assert not is_indexed(store_copy, run_id)
    with pytest.raises(FileNotFoundError):
        write_depth(store_copy, run_id, np.zeros((4, 4), np.float32), "m", "relative")
    assert sorted(p.name for p in outside.iterdir()) == before  # nothing written outside the store


def test_sql_console_errors_quoting_stored_values_are_text(markup_store, monkeypatch):
    from streamlit.testing.v1 import AppTest

    root, _ = markup_store
    monkeypatch.setenv("STEPX_STORE", str(root))
    at = AppTest.from_file(str(VIEWS / "sql.py"), default_timeout=120).run()
    at.text_area(key="sql_query").input("SELECT CAST(prompt AS INTEGER) FROM runs").run()  # quotes the prompt
    at.button(key="sql_run").click().run()
    assert not at.exception and len(at.error) == 1
    assert "onerror" in at.error[0].value and not LIVE.search(at.error[0].value), at.error[0].value


# -- the terminal --------------------------------------------------------------------------------------------

TERMINAL_ATTACK = "a \x1b[2J\x1b]8;;http://evil/\x07click\x1b]8;;\x07 \u009b31m red \u202e circle"


def test_stored_text_never_drives_the_terminal(tmp_path, capsys):
    """A stored prompt with escape sequences (clear screen, a hidden hyperlink, C1 CSI, a bidi override) is printed
    escaped by `stepx show`, in `stepx sql` tables, and in the one-line error that quotes it."""
    from datetime import UTC, datetime

    import numpy as np

    from jobs.synth import synth_trace
    from pipeline.trace_writer import build_tables, write_tables
    from stepx.cli import main

    trace = synth_trace(np.random.default_rng(0), datetime(2026, 1, 1, tzinfo=UTC), steps=2)
    trace.run["prompt"] = TERMINAL_ATTACK
    write_tables(tmp_path, trace.run["run_id"], build_tables(trace), 2)
    store = ["--store", str(tmp_path)]
    for argv, status in [
        (["show", trace.run["run_id"], *store], 0),
        (["sql", "SELECT prompt FROM runs", *store], 0),
        (["sql", "SELECT CAST(prompt AS INTEGER) FROM runs", *store], 2),
    ]:
        assert main(argv) == status
        out = capsys.readouterr()
        text = out.out + out.err
        assert "click" in text and not any(c in text for c in "\x1b\x07\u009b\u202e"), argv


@pytest.mark.parametrize("text", ["a \x1b[2J red circle", "a \u009b31m red circle", "a red\x7f circle", "a\x00b"])
def test_prompts_and_tags_with_control_characters_are_refused(tmp_path, text):
    from jobs import queue
    from schema.limits import LimitError, check_prompt

    with pytest.raises(LimitError, match="control characters"):
        check_prompt(text)
    with pytest.raises(queue.JobError, match="control characters"):
        queue.submit(tmp_path, {"prompt": "a red circle", "model": "shapes", "tags": [text]})
    check_prompt("a café\tcircle\nwith a\u00a0space")  # tabs, newlines and non-ASCII text are fine


@pytest.mark.parametrize("path", [123, b"/tmp", "\x00", ["x"], "/dev/null", "/etc/passwd"])
def test_open_store_refuses_what_is_not_a_store_folder_in_one_line(path):
    import stepx

    with pytest.raises(StoreError) as err:
        stepx.open_store(path).runs()
    assert "\n" not in str(err.value) and ("folder" in str(err.value))


@pytest.mark.parametrize(
    "table, column, value",
    [
        ("self_attention", "grid_height", 60_000),
        ("self_attention", "grid_width", -5),
        ("cross_attention", "level_height", 100_000),
        ("cross_attention", "level_width", 0),
    ],
)
def test_run_files_whose_stored_shape_lies_are_missing_data(store_copy, table, column, value):
    run_id = manifest(store_copy)["run_ids"][0]
    path = store_copy / "runs" / run_id / f"{table}.parquet"
    pf = pq.ParquetFile(path)
    t = pf.read()
    i = t.schema.get_field_index(column)
    t = t.set_column(i, column, pa.array([value] * t.num_rows, t.schema.field(i).type))
    pq.write_table(t.replace_schema_metadata(pf.schema_arrow.metadata), path)
    s = Store(store_copy)
    call = (lambda: s.self_attention(run_id)) if table == "self_attention" else (lambda: s.word_map(run_id, "Global"))
    with pytest.raises(RunDataMissing, match="stored"):
        call()


def test_damaged_depth_file_is_missing_data(store_copy):
    import numpy as np

    from pipeline.depth import write_depth

    run_id = manifest(store_copy)["run_ids"][0]
    path = write_depth(store_copy, run_id, np.ones((4, 4), np.float32), "m", "relative")
    assert Store(store_copy).depth(run_id)[0].shape == (4, 4)
    pf = pq.ParquetFile(path)
    t = pf.read()
    t = t.set_column(t.schema.get_field_index("height"), "height", pa.array([1000], t.schema.field("height").type))
    pq.write_table(t.replace_schema_metadata(pf.schema_arrow.metadata), path)
    with pytest.raises(RunDataMissing, match="damaged"):
        Store(store_copy).depth(run_id)


@pytest.mark.parametrize("kind", ["garbage", "fifo", "folder"])
def test_damaged_queue_file_is_one_line_everywhere(tmp_path, capsys, kind):
    from jobs import queue
    from stepx.cli import main

    path = queue.queue_path(tmp_path)
    path.parent.mkdir(parents=True)
    if kind == "garbage":
        path.write_text("not a database")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(queue.QueueDamaged, match="move it away"):
        within(20, lambda: queue.submit(tmp_path, {"prompt": "a red circle", "model": "shapes"}))
    assert within(20, lambda: main(["jobs", "--store", str(tmp_path)])) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "move it away" in err and "unexpected" not in err
