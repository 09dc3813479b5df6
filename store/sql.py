"""Read-only SQL over a store, with the engine as the boundary and limits that hold for any query.

    from store.sql import Limits, Source, run_query
    run_query({"runs": Source(files, schema)}, {}, "SELECT count(*) FROM runs", Limits())

Every query gets a new, empty, in-memory DuckDB in a new child process (forked from the caller when
nothing else runs there, as in the CLI, else from a small preloaded server, as for the dashboard's
threads), and both are thrown away afterwards, so nothing a statement creates, replaces, drops or sets
is ever seen by another query, session or user. Layers, innermost first:

1. The engine (`connect`): the store's tables are registered as Arrow datasets, read by pyarrow, so
   DuckDB itself needs no file access and gets none: external access off with no allowed directories
   or paths (every file read or write from SQL is refused: COPY, EXPORT/IMPORT, ATTACH of a file,
   read_*, glob, INSTALL, LOAD from disk), no temp directory (nothing spills, nothing to read back),
   extensions neither installed nor loaded on their own, no persistent secrets, memory_limit and
   threads set, and the configuration locked (SET/RESET/PRAGMA of a setting is refused); the settings
   are read back, and a DuckDB that reports others is not used.
2. The process (`_query_process`, `run_query`): a data-size limit catches memory DuckDB does not
   account for (string builders such as `repeat('x', 4000000000)`), a file-size limit of 0 bytes means
   no file can grow, it works in a removed folder, and the kernel ends it at the time limit, whatever
   it is doing (DuckDB's interrupt is not checked inside one function call).
3. The friendly early refusal (`check_statement`): one SELECT (or EXPLAIN of one) at a time. A
   courtesy with a clear message, not the boundary: tests run every hostile statement without it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.abc
import io
import os
import pickle
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zoneinfo
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection

import duckdb
import pyarrow as pa
import pyarrow.fs

from schema.limits import LIMITS, LimitError, check_value
from store.errors import QueryError, Results

# The console's limits are rows of schema.limits' table (name, default, bounds, help); the flags set them.
FLAGS = {"timeout_s": "--timeout", "max_rows": "--max-rows", "memory_limit_mb": "--memory-limit-mb"}
THREADS = min(4, os.cpu_count() or 1)  # DuckDB and pyarrow threads per query
OVERHEAD_MB = 256  # Arrow scan buffers and the answer's Python objects, on top of the engine's memory_limit
RESULT_MB = 256  # largest answer (pickled) a query may hand back to the caller's process
SETUP_TIMEOUT_S = 120.0  # starting the query process and registering the tables (a cold machine's first query)


class SettingError(QueryError):
    """A limit given outside its bounds; the message is one line naming the setting."""


@dataclass(frozen=True)
class Limits:
    """What one query may spend; each field is a row of schema.limits' table, checked on creation."""

    timeout_s: float = LIMITS["timeout_s"].default
    max_rows: int = LIMITS["max_rows"].default
    memory_limit_mb: int = LIMITS["memory_limit_mb"].default

    def __post_init__(self) -> None:
        for f in fields(self):
            try:
                object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name)))
            except LimitError as exc:
                raise SettingError(f"{exc} (set by {FLAGS[f.name]} on the command line)") from None


@dataclass(frozen=True)
class Source:
    """One table the console shows: the Parquet files it reads and the Arrow schema DuckDB sees."""

    files: tuple[str, ...]
    schema: pa.Schema


def scannable(schema: pa.Schema) -> pa.Schema:
    """The schema DuckDB can scan from Arrow: float16 widened to float32 (also inside lists), no metadata."""

    def widen(t: pa.DataType) -> pa.DataType:
        if pa.types.is_float16(t):
            return pa.float32()
        if pa.types.is_list(t):
            return pa.list_(widen(t.value_type))
        if pa.types.is_large_list(t):
            return pa.large_list(widen(t.value_type))
        return t

    return pa.schema([pa.field(f.name, widen(f.type), f.nullable) for f in schema])


class _NoPandas(importlib.abc.MetaPathFinder):
    """Refuses `import pandas`: pyarrow.dataset imports it eagerly (~1 s) and the query process never needs it."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == "pandas":
            raise ImportError("pandas is not loaded in the SQL query process")


def _datasets(without_pandas: bool = False) -> object:
    """pyarrow.dataset, imported on first use (the caller of `run_query` never needs it)."""
    if without_pandas and "pyarrow.dataset" not in sys.modules and "pandas" not in sys.modules:
        blocker = _NoPandas()
        sys.meta_path.insert(0, blocker)
        try:
            importlib.import_module("pyarrow.dataset")
        finally:
            sys.meta_path.remove(blocker)
    import pyarrow.dataset as ds

    return ds


# What the engine must report once `connect` is done; checked there, so a DuckDB that behaves otherwise fails closed.
LOCKED = {
    "enable_external_access": "false",
    "allowed_directories": "[]",
    "allowed_paths": "[]",
    "temp_directory": "",
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
    "lock_configuration": "true",
}


def connect(
    sources: dict[str, Source], views: dict[str, str], memory_limit_mb: int, threads: int = THREADS
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB showing `sources` (Arrow datasets) and `views`, that can touch no file at all."""
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "allow_persistent_secrets": False,
            "temp_directory": "",  # nothing spills to disk, and there is no temp folder to read back
            "max_temp_directory_size": "0B",
            "memory_limit": f"{int(memory_limit_mb)}MB",
            "threads": int(threads),
        },
    )
    # DuckDB allows its own database paths even with external access off; for ':memory:' those are files
    # named ':memory:', ':memory:.wal', ... in the cwd, which SQL could then write. Allow nothing at all.
    con.execute("SET allowed_paths = []")
    con.execute("SET allowed_directories = []")
    con.execute("SET enable_external_access = false")  # no file read or write from SQL from here on
    ds = _datasets()
    local = pa.fs.LocalFileSystem()
    for name, src in sources.items():
        data = ds.FileSystemDataset.from_paths(
            list(src.files), schema=scannable(src.schema), format=ds.ParquetFileFormat(), filesystem=local
        )
        con.register(name, data)  # read by pyarrow, outside DuckDB's file system
    for name, select in views.items():
        con.execute(f"CREATE VIEW {name} AS {select}")
    con.execute("SET lock_configuration = true")  # SET / RESET / PRAGMA of any setting is refused from here on
    names = ", ".join(f"'{n}'" for n in LOCKED)
    found = dict(con.execute(f"SELECT name, value FROM duckdb_settings() WHERE name IN ({names})").fetchall())
    if found != LOCKED:
        con.close()
        raise QueryError(f"the SQL sandbox could not be locked (DuckDB {duckdb.__version__} reports {found})")
    return con


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)
_ALLOWED = {duckdb.StatementType.SELECT}


def check_statement(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The query if it is one SELECT (or EXPLAIN of one); else QueryError with a friendly line. Not the boundary."""
    text = (query or "").strip()
    if not text:
        raise QueryError("the query is empty: write one SELECT statement")
    try:
        statements = con.extract_statements(text)
    except duckdb.Error as exc:
        raise QueryError(f"the query does not parse: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise QueryError(f"one statement at a time, please (got {len(statements)})")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.sub("", _strip_comments(statements[0].query), count=1)
        with contextlib.suppress(duckdb.Error, IndexError):  # not a statement on its own: refused below
            kind = con.extract_statements(inner)[0].type if inner.strip() else kind
    if kind not in _ALLOWED:
        name = str(kind).rsplit(".", 1)[-1]
        raise QueryError(
            f"only SELECT queries are allowed here; {name} statements are refused (the store is read-only)"
        )
    return text


def _strip_comments(sql: str) -> str:
    """The statement without leading SQL comments."""
    return re.sub(r"^(\s*(--[^\n]*(\n|$)|/\*.*?\*/))*", "", sql, flags=re.DOTALL)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _memory_message(limits: Limits) -> str:
    return (
        f"the query needed more than {limits.memory_limit_mb:,} MB of memory and was stopped; narrow it or "
        f"raise the 'memory_limit_mb' setting ({FLAGS['memory_limit_mb']})"
    )


def _timeout_message(limits: Limits) -> str:
    return (
        f"the query ran longer than {limits.timeout_s:g} s and was stopped; narrow it or "
        f"raise the 'timeout_s' setting ({FLAGS['timeout_s']})"
    )


def error_message(exc: BaseException, limits: Limits) -> str:
    """One line for the user for what a query raised inside the sandbox."""
    if isinstance(exc, QueryError):
        return str(exc)
    if isinstance(exc, duckdb.OutOfMemoryException | MemoryError | pa.ArrowMemoryError):
        return _memory_message(limits)
    if isinstance(exc, duckdb.InterruptException):
        return _timeout_message(limits)
    if isinstance(exc, duckdb.PermissionException):
        return f"refused: the console reads only the store's tables, never files ({_first_line(exc)})"
    if isinstance(exc, duckdb.InvalidInputException) and "configuration has been locked" in str(exc):
        return f"refused: the console's settings are locked ({_first_line(exc)})"
    return f"query failed: {_first_line(exc)}"


# -- the query process --------------------------------------------------------------------------------


def _confine(limits: Limits) -> None:
    """OS limits on this (query) process: bounded memory, no file can grow, no core dump, few threads."""
    data = _data_bytes() + ((limits.memory_limit_mb + OVERHEAD_MB) << 20)  # on top of what it inherited
    resource.setrlimit(resource.RLIMIT_DATA, (data, data))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the time limit ends the process
    pa.set_cpu_count(THREADS)
    pa.set_io_thread_count(THREADS)


def _leave_cwd() -> None:
    """Work in an empty folder that no longer exists: a relative path opens nothing, creates nothing."""
    gone = tempfile.mkdtemp(prefix="stepx-sql-")
    os.chdir(gone)
    os.rmdir(gone)


def _data_bytes() -> int:
    """This process's data segment now (VmData: what RLIMIT_DATA counts), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


class _AnswerPickler(pickle.Pickler):
    """Pickles an answer with time zones by key, so the parent's unpickler needs no `getattr`."""

    def reducer_override(self, obj: object) -> object:
        if isinstance(obj, zoneinfo.ZoneInfo):
            return zoneinfo.ZoneInfo, (obj.key,)
        return NotImplemented


def _dumps(message: tuple) -> bytes:
    buf = io.BytesIO()
    _AnswerPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buf.getvalue()


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(_dumps(message))


def _query_process(fd: int) -> None:
    """Body of one query process: read the request, confine, open the engine, answer once, exit.

    The kernel ends it at the time limit (SIGALRM's default action), whatever DuckDB is doing.
    """
    conn = Connection(fd)
    limits = Limits()
    try:
        sources, views, query, limits, precheck = pickle.loads(conn.recv_bytes())  # from our own parent
        _datasets(without_pandas=True)
        _leave_cwd()
        _confine(limits)
        con = connect(sources, views, limits.memory_limit_mb)
        _send(conn, ("ready",))
        signal.setitimer(signal.ITIMER_REAL, limits.timeout_s)
        text = check_statement(con, query) if precheck else query
        t0 = time.perf_counter()
        result = con.execute(text)
        columns = [d[0] for d in result.description or []]
        rows = result.fetchmany(limits.max_rows + 1)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        answer = _dumps(("ok", Results(rows[: limits.max_rows], columns, len(rows) > limits.max_rows, elapsed_ms)))
        if len(answer) > RESULT_MB << 20:
            raise QueryError(
                f"the answer is {len(answer) >> 20:,} MB, more than the {RESULT_MB} MB the console returns; "
                "select fewer rows or columns, or aggregate"
            )
        conn.send_bytes(answer)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line for the parent
        with contextlib.suppress(BaseException):  # the parent reports a silent death itself
            _send(conn, ("error", error_message(exc, limits)))
    finally:
        os._exit(0)  # no interpreter teardown (DuckDB and Arrow threads): the answer is sent


def _serve(fd: int) -> None:
    """The query server: single-threaded, DuckDB and pyarrow loaded; forks one query process per socket received.

    Exits when its parent closes the control socket (or dies). Children are reaped by the kernel.
    """
    control = socket.socket(fileno=fd)
    _datasets(without_pandas=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            break
        if not msg:
            break
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            continue
        try:
            pid = os.fork()
        except OSError:
            pid = -1  # no process to spare: closing the socket tells the caller
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _query_process(fds[0])
        os.close(fds[0])
    os._exit(0)


class _Server:
    """The parent's handle on the query server: started on first use, restarted if it died.

    Not multiprocessing's forkserver: its children re-run the caller's `__main__` (Streamlit's, pytest's)
    before each query, and it can't be told not to.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._control: socket.socket | None = None

    def _start(self) -> None:
        if self._control is not None:
            self._control.close()
        mine, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds the `store` package
        code = f"import sys; sys.path.insert(0, {root!r}); from store.sql import _serve; _serve({theirs.fileno()})"
        # One thread at fork time (no BLAS pool), and Arrow on malloc so the data limit counts only what is used.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "ARROW_DEFAULT_MEMORY_POOL": "system"}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True, env=env
        )
        theirs.close()
        self._control = mine

    def open(self) -> Connection:
        """A connection to a new query process."""
        mine, theirs = socket.socketpair()
        try:
            with self._lock:
                for _ in range(2):
                    if self._proc is None or self._proc.poll() is not None:
                        self._start()
                    try:
                        socket.send_fds(self._control, [b"q"], [theirs.fileno()])
                        break
                    except OSError:
                        self._proc = None  # the server is gone: start another
        finally:
            theirs.close()
        return Connection(mine.detach())

    def close(self) -> None:
        """Stop the server (it exits when the control socket closes)."""
        with self._lock:
            if self._control is not None:
                self._control.close()
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5)
            self._proc = self._control = None


_SAFE_GLOBALS = {
    ("store.errors", "Results"),
    ("datetime", "date"),
    ("datetime", "time"),
    ("datetime", "datetime"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("decimal", "Decimal"),
    ("uuid", "UUID"),
    ("zoneinfo", "ZoneInfo"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
}


class _AnswerUnpickler(pickle.Unpickler):
    """Unpickles a query process's answer, allowing only the value types DuckDB returns."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise QueryError(f"the answer holds a {module}.{name} value the console can't return; cast it to VARCHAR")


_SERVER = _Server()
atexit.register(_SERVER.close)
GRACE_S = 2.0  # past the time limit, how long the parent waits for the kernel to end the query process


def run_query(
    sources: dict[str, Source],
    views: dict[str, str],
    query: str,
    limits: Limits | None = None,
    precheck: bool = True,
    via: str | None = None,
) -> Results:
    """Run one query in a fresh sandboxed process; QueryError (one line) for a refusal, failure or limit.

    The process is forked from this one when nothing else runs here (one thread, native ones included),
    else from the query server (the dashboard's threads); `via` ("fork" or "server") forces one, for tests.
    """
    limits = limits or Limits()
    via = via or ("fork" if _one_thread() else "server")
    conn, pid = _fork_here() if via == "fork" else (_SERVER.open(), None)
    try:
        conn.send_bytes(pickle.dumps((sources, views, query, limits, precheck), protocol=pickle.HIGHEST_PROTOCOL))
        first = _receive(conn, SETUP_TIMEOUT_S)
        if first is None:
            raise QueryError(f"the SQL sandbox did not start within {SETUP_TIMEOUT_S:g} s; try again")
        if first[0] != "ready":
            return _answer(first)
        started = time.monotonic()
        try:
            answer = _receive(conn, limits.timeout_s + GRACE_S)
        except EOFError:
            if time.monotonic() - started >= limits.timeout_s * 0.99:
                raise QueryError(_timeout_message(limits)) from None
            raise QueryError(
                "the query process stopped unexpectedly; if the query is large, narrow it or raise the "
                f"'memory_limit_mb' setting ({FLAGS['memory_limit_mb']})"
            ) from None
        if answer is None:
            raise QueryError(_timeout_message(limits))
        return _answer(answer)
    except (EOFError, OSError):  # it died before reading the request or answering it
        raise QueryError("the query process stopped before it was ready; try again") from None
    finally:
        conn.close()
        if pid is not None and os.waitpid(pid, os.WNOHANG) == (0, 0):  # our unreaped child: pid not reused
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _one_thread() -> bool:
    """Whether this process runs one thread, native ones included: forking beside DuckDB's or Arrow's thread
    pools copies their locks mid-use, and the child can crash (seen: SIGSEGV before it was ready)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _fork_here() -> tuple[Connection, int]:
    """Fork the query process from this process; (connection to it, its pid)."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        mine.close()
        _query_process(theirs.detach())
    theirs.close()
    return Connection(mine.detach()), pid


def _answer(message: tuple) -> Results:
    if message[0] == "error":
        raise QueryError(message[1])
    return message[1]


def _receive(conn: Connection, timeout_s: float) -> tuple | None:
    """The query process's next message; None after `timeout_s`; EOFError when it ended without one."""
    if not conn.poll(timeout_s):
        return None
    try:
        data = conn.recv_bytes()
    except OSError:
        raise EOFError from None
    return _AnswerUnpickler(io.BytesIO(data)).load()


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
