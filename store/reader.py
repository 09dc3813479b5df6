"""Read API over a StepX store: runs, tokens, word maps, self-attention, images and SQL.

Torch-free and lock-free: listing and SQL go through an in-memory DuckDB whose views read the
index segments named by `index/manifest.json` (re-read whenever it is replaced) and, for the raw
tables, the files of exactly the runs that manifest lists, so every view shows the same runs; maps
and images come straight from each run's Parquet files by row group, after the run id is found in
the index. A damaged index raises IndexDamaged, whose one line says to run `stepx index rebuild`.
The DuckDB connection can reach only the store's folders and its configuration is locked (see `open_sandboxed`).
"""

from __future__ import annotations

import os
import shlex
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schema import INDEX_TABLES, RUN_FILES, TABLES, SchemaVersionError, check_version
from schema.codec import decode_maps, decode_rows
from schema.layout import (
    MANIFEST,
    ManifestError,
    index_dir,
    index_problem,
    parse_manifest,
    read_manifest_bytes,
    run_dir,
    runs_dir,
    store_root,
    valid_run_id,
)
from schema.maps import (
    ALL,
    DEFAULT_AGGREGATION,
    check_aggregation,
    combine_levels,
    level_weights,
)
from schema.views import DAAM_MAPS_SQL, WORD_STATS_SQL, empty_source, parquet_source, view_sql
from store.errors import IndexDamaged, Results, RunDataMissing, RunNotFound, StoreError, WordNotFound
from store.sql import Limits, Source, run_query

GLOBAL = "Global"
TEXT_SHARE_TOKEN = -1  # token_index of a DiT run's text-share pseudo-token (pipeline.generate_dit)
ALL_LEVELS = None
RAW_TABLES = ("cross_attention", "self_attention", "images")
OPTIONAL_TABLES = ("probe_maps",)  # written later beside some runs (`stepx probe`): the runs that have one


@dataclass
class Word:
    """A prompt word and the stored token positions it spans."""

    word_index: int
    word: str
    token_indices: list[int]
    encoder: str | None = None  # 'clip' or 't5' (SD3 stores each word once per encoder); None before schema 1.4


@dataclass
class SelfAttention:
    """A self-attention matrix: rows are query cells, columns key cells, both row-major on `grid`."""

    grid: tuple[int, int]
    matrix: np.ndarray  # (queries, keys) float32, rows sum to ~1
    kind: str
    step_index: int


def open_sandboxed(root: Path) -> duckdb.DuckDBPyConnection:
    """The Store's own connection (fixed SQL only): reads the store's runs and index folders, config locked.

    A user's SQL never runs here; `Store.sql` gives each query its own sandbox (store/sql.py).
    """
    con = duckdb.connect(":memory:")
    allowed = [str(runs_dir(root).resolve()) + "/", str(index_dir(root).resolve()) + "/"]
    con.execute("SET allowed_paths = []")  # DuckDB's default allows ':memory:*' files in the cwd
    con.execute("SET allowed_directories = ?", [allowed])
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")
    return con


@dataclass
class _Catalog:
    """The index's runs and tokens held in memory (Arrow), with row positions by run id."""

    key: tuple | None
    runs_table: pa.Table | None
    run_rows: dict[str, int]
    tokens_table: pa.Table | None
    token_rows: dict[str, tuple[int, int]]

    @classmethod
    def build(cls, key: tuple | None, runs: pa.Table | None, tokens: pa.Table | None) -> _Catalog:
        run_rows = {r: i for i, r in enumerate(runs.column("run_id").to_pylist())} if runs is not None else {}
        token_rows: dict[str, tuple[int, int]] = {}
        if tokens is not None and tokens.num_rows:
            tokens = tokens.sort_by([("run_id", "ascending"), ("token_index", "ascending")])
            ids = tokens.column("run_id").to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            ends = np.r_[starts[1:], len(ids)]
            token_rows = {ids[a]: (int(a), int(b)) for a, b in zip(starts, ends, strict=True)}
        return cls(key, runs, run_rows, tokens, token_rows)

    def has(self, run_id: str) -> bool:
        return run_id in self.run_rows

    def run(self, run_id: str) -> dict | None:
        i = self.run_rows.get(run_id)
        return None if i is None else self.runs_table.slice(i, 1).to_pylist()[0]

    def tokens(self, run_id: str) -> list[dict]:
        span = self.token_rows.get(run_id)
        return [] if span is None else self.tokens_table.slice(span[0], span[1] - span[0]).to_pylist()


def _run_folders(runs: Path) -> set[str]:
    """Names of the real folders under runs/ (not symlinks: the index never lists those, see list_run_dirs)."""
    try:
        with os.scandir(runs) as entries:
            return {e.name for e in entries if e.is_dir(follow_symlinks=False)}
    except OSError:
        return set()


def _not_plain(path: Path) -> bool:
    """Whether a run file exists but is not a regular file in a real run folder (missing files are not this)."""
    try:
        return not stat.S_ISDIR(os.lstat(path.parent).st_mode) or not stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError:
        return True


class Store:
    """A read-only view of one store folder; safe to share across threads."""

    def __init__(self, root: str | Path | None = None, cache_runs: int = 64) -> None:
        if root is not None and (not isinstance(root, str | os.PathLike) or "\x00" in str(root)):
            raise StoreError(f"a store is a folder path, not {str(root)[:60]!r}")
        self.root = store_root(root).resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"the store {self.root} is not a folder")
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._manifest_key: tuple | None = None
        self._manifest: dict = {}
        self._files: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._cat: _Catalog | None = None
        self._unreadable: dict[str, str] = {}
        self._views: dict[str, str] = {}
        self._table_paths: dict[str, list[str]] = {}  # the files each table reads, for this manifest
        self._checked: tuple[tuple | None, dict[str, list[str]]] | None = None  # the same, unreadable ones left out
        self._file_ok: dict[str, tuple[int, int, int]] = {}  # raw run files found readable, by path
        self._cache_runs = cache_runs

    # -- index and views ------------------------------------------------------------------
    def _manifest_stat(self) -> tuple | None:
        try:
            st = (index_dir(self.root) / MANIFEST).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:  # index/ is a file, or unreadable: _load_manifest says the index is damaged
            return ("unreadable", str(exc))
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _damaged(self, why: str) -> IndexDamaged:
        return IndexDamaged(
            f"the store's index is damaged ({why}): run `stepx index rebuild --store {shlex.quote(str(self.root))}`"
        )

    def _load_manifest(self) -> dict:
        """The current manifest, checked field by field and segment by segment ({} for a new store)."""
        try:
            manifest = parse_manifest(read_manifest_bytes(index_dir(self.root) / MANIFEST))
        except FileNotFoundError:
            return {}
        except (ManifestError, OSError) as exc:
            raise self._damaged(str(exc)) from None
        check_version({b"stepx.schema_version": manifest["schema_version"].encode()}, where=f"the store {self.root}")
        problem = index_problem(index_dir(self.root), manifest)
        if problem:
            raise self._damaged(problem)
        return manifest

    def _refresh(self) -> None:
        key = self._manifest_stat()
        if self._con is not None and key == self._manifest_key:
            return
        with self._lock:
            key = self._manifest_stat()
            if self._con is not None and key == self._manifest_key:
                return
            manifest = self._load_manifest() if key is not None else {}
            files = self._table_files(manifest)
            views = {
                table: parquet_source(paths, by_name=table in INDEX_TABLES) if paths else empty_source(TABLES[table])
                for table, paths in files.items()
            }
            views["word_stats"] = WORD_STATS_SQL
            con = self._con or open_sandboxed(self.root)
            for name, source in views.items():
                try:
                    con.execute(view_sql(name, source))
                except duckdb.Error as exc:  # a view binds its first file: leave unreadable raw files out
                    if name not in RAW_TABLES + OPTIONAL_TABLES:
                        raise self._damaged(f"the {name} segments can't be read: {str(exc)[:80]}") from None
                    ok = [p for p in files[name] if self._readable(Path(p))]
                    views[name] = parquet_source(ok, by_name=False) if ok else empty_source(TABLES[name])
                    con.execute(view_sql(name, views[name]))
            self._con, self._manifest, self._manifest_key, self._views = con, manifest, key, views
            self._table_paths, self._checked = files, None

    def _table_files(self, manifest: dict) -> dict[str, list[str]]:
        """The Parquet files behind each table for this manifest: its index segments, and the raw files of
        exactly the runs it lists, so no view (here or in the SQL console) shows a run that `runs` doesn't."""
        segments = manifest.get("segments", {})
        files = {t: [str(index_dir(self.root) / s["file"]) for s in segments.get(t, [])] for t in INDEX_TABLES}
        present = _run_folders(runs_dir(self.root))
        run_ids = [r for r in manifest.get("run_ids", []) if r in present and valid_run_id(r)]
        for table in RAW_TABLES:  # no engine ever opens a FIFO (it would block) or a symlink out of the store
            paths = (run_dir(self.root, r) / RUN_FILES[table] for r in run_ids)
            files[table] = [str(p) for p in paths if not _not_plain(p)]
        for table in OPTIONAL_TABLES:
            paths = (run_dir(self.root, r) / RUN_FILES[table] for r in run_ids)
            files[table] = [str(p) for p in paths if p.is_file() and not _not_plain(p)]
        return files

    def _checked_files(self) -> dict[str, list[str]]:
        """The table files with raw ones that are missing or not whole Parquet left out (see unreadable_files).

        Checked once per manifest, on first use (~0.1 ms a file), so listing runs never pays for it.
        """
        self._refresh()
        with self._lock:
            if self._checked is None or self._checked[0] != self._manifest_key:
                self._unreadable = {}
                files = {
                    table: paths if table in INDEX_TABLES else [p for p in paths if self._readable(Path(p))]
                    for table, paths in self._table_paths.items()
                }
                self._checked = (self._manifest_key, files)
            return self._checked[1]

    def _readable(self, path: Path) -> bool:
        """Whether a run file exists and ends like Parquet (remembered by inode, size and mtime: runs are immutable)."""
        try:
            st = path.stat()
        except OSError:
            self._unreadable[str(path.relative_to(self.root))] = "missing"
            return False
        if _not_plain(path):
            self._unreadable[str(path.relative_to(self.root))] = "not a regular file inside the store"
            return False
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._file_ok.get(str(path)) == ident:
            return True
        try:
            with open(path, "rb") as fh:
                head = fh.read(4)
                fh.seek(-4, os.SEEK_END)
                ok = head == b"PAR1" and fh.read(4) == b"PAR1"
        except OSError:
            ok = False
        if ok:
            self._file_ok[str(path)] = ident
        else:
            self._unreadable[str(path.relative_to(self.root))] = "not a complete Parquet file"
        return ok

    def unreadable_files(self) -> dict[str, str]:
        """Run files left out of the raw SQL views because they could not be read."""
        self._checked_files()
        return dict(self._unreadable)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor over the current views for the project's own fixed SQL with bound parameters (one per call).

        Never pass a user's text here: it shares one connection with every caller; `sql` is the user's door.
        """
        self._refresh()
        return self._con.cursor()

    def bad_runs(self) -> dict[str, str]:
        """Runs the index could not read, by id, with the reason."""
        self._refresh()
        return dict(self._manifest.get("bad_runs", {}))

    # -- runs and tokens ------------------------------------------------------------------
    def runs(
        self,
        text: str | None = None,
        tag: str | None = None,
        model: str | None = None,
        gallery: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Runs, newest first, filtered by prompt text (case-insensitive), tag, model, gallery."""
        sql = (
            "SELECT run_id, created_at, prompt, negative_prompt, seed, steps, guidance, model_name, "
            "width, height, tags, gallery FROM runs WHERE true"
        )
        for name, value in (("text", text), ("tag", tag), ("model", model), ("gallery", gallery)):
            if value is not None and not isinstance(value, str):
                raise StoreError(f"runs(): {name} must be text, got {type(value).__name__}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < 2**62):
            raise StoreError(f"runs(): limit must be a whole number from 0 (no limit), got {str(limit)[:40]}")
        params: list = []
        if text:
            sql += " AND contains(lower(prompt), lower(?))"
            params.append(text)
        if tag:
            sql += " AND list_contains(tags, ?)"
            params.append(tag)
        if model:
            sql += " AND model_name = ?"
            params.append(model)
        if gallery:
            sql += " AND gallery = ?"
            params.append(gallery)
        sql += " ORDER BY created_at DESC, run_id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        cur = self.cursor().execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def _catalog(self) -> _Catalog:
        """runs and tokens of the current index in memory, for O(1) lookups by run id."""
        self._refresh()
        cat = self._cat
        if cat is None or cat.key != self._manifest_key:
            segs = self._manifest.get("segments", {})
            tables = {}
            for name in ("runs", "tokens"):
                files = [index_dir(self.root) / seg["file"] for seg in segs.get(name, [])]
                try:
                    parts = [pq.read_table(f) for f in files]
                except (OSError, pa.ArrowException) as exc:
                    raise self._damaged(f"a {name} segment is unreadable: {str(exc)[:80]}") from None
                tables[name] = pa.concat_tables(parts, promote_options="default") if parts else None
            cat = _Catalog.build(self._manifest_key, tables["runs"], tables["tokens"])
            self._cat = cat
        return cat

    def run(self, run_id: str) -> dict:
        """All metadata of one run; RunNotFound when absent or not a run id at all."""
        row = self._catalog().run(self._indexed(run_id))
        assert row is not None
        return row

    def _indexed(self, run_id: str) -> str:
        """The run id when the index lists it, else RunNotFound: checked before any path is built from it."""
        if not valid_run_id(run_id):
            shown = repr(run_id) if len(repr(run_id)) <= 80 else repr(run_id)[:77] + "..."
            raise RunNotFound(f"{shown} is not a run id (see `stepx runs`)")
        if not self._catalog().has(run_id):
            raise RunNotFound(f"no run {run_id!r} in the store {self.root}")
        return run_id

    def tokens(self, run_id: str) -> list[dict]:
        """The run's tokens in order (start, word pieces, end)."""
        rows = self._catalog().tokens(self._indexed(run_id))
        if not rows:
            self.run(run_id)
        return rows

    def words(self, run_id: str) -> list[Word]:
        """The prompt's words in order, multi-piece words merged."""
        words: dict[int, Word] = {}
        for t in self.tokens(run_id):
            if t["kind"] == "word":
                w = words.setdefault(t["word_index"], Word(t["word_index"], t["word"], [], t.get("encoder")))
                w.token_indices.append(t["token_index"])
        return list(words.values())

    def encoders(self, run_id: str) -> list[str]:
        """Text encoders whose positions the run stores maps for, in order ('clip', 't5'; [] before schema 1.4)."""
        return list(dict.fromkeys(t["encoder"] for t in self.tokens(run_id) if t.get("encoder") and t["has_map"]))

    def resolve_word(self, run_id: str, word: str | int, encoder: str | None = None) -> list[int]:
        """Token indices of a word given as text (every occurrence), a word index, or Global; `encoder` keeps
        one text encoder's tokens (an SD3 word has a CLIP and a T5 map; None averages both)."""
        words = self.words(run_id)
        if encoder is not None:
            if encoder not in self.encoders(run_id):
                known = ", ".join(self.encoders(run_id)) or "none recorded"
                raise StoreError(f"run {run_id} has no {encoder!r} text encoder; its encoders: {known}")
            words = [w for w in words if w.encoder == encoder]
        if isinstance(word, bool) or not isinstance(word, str | int | np.integer):
            raise WordNotFound(f"a word is text or a word index, not {type(word).__name__}")
        if isinstance(word, str) and word == GLOBAL:
            return [i for w in words for i in w.token_indices]
        if isinstance(word, int | np.integer):
            for w in words:
                if w.word_index == word:
                    return w.token_indices
        else:
            key = word.strip().casefold()
            found = [i for w in words if w.word.casefold() == key for i in w.token_indices]
            if found:
                return found
        listing = ", ".join(dict.fromkeys(w.word for w in words)) or "(none)"
        raise WordNotFound(f"{word!r} is not a word of this prompt; its words are: {listing}")

    # -- per-run files ------------------------------------------------------------------
    def _file(self, run_id: str, table: str) -> tuple[pq.ParquetFile, list[tuple[int, int]]]:
        """(ParquetFile, per-row-group (min, max) step_index) of a run's table, cached by run."""
        cache_key = (self._indexed(run_id), table)
        hit = self._files.get(cache_key)
        if hit is not None:
            self._files.move_to_end(cache_key)
            return hit
        path = self._run_file(run_id, table)
        try:
            pf = pq.ParquetFile(path)
            check_version(pf.schema_arrow.metadata, where=f"run {run_id}")
        except SchemaVersionError:
            raise
        except FileNotFoundError as exc:
            raise RunDataMissing(f"run {run_id}: its {path.name} is missing from the store") from exc
        except (OSError, pa.ArrowException) as exc:
            raise RunDataMissing(f"run {run_id}: {path.name} is unreadable ({exc})") from exc
        col = pf.schema_arrow.get_field_index("step_index")
        if col < 0 or not pa.types.is_integer(pf.schema_arrow.field(col).type):
            raise RunDataMissing(f"run {run_id}: {path.name} is damaged (no whole-number step_index column)")
        ranges = []
        for rg in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(rg).column(col).statistics
            ranges.append((st.min, st.max) if st is not None and st.has_min_max else (-(2**31), 2**31))
        entry = (pf, ranges)
        with self._lock:
            self._files[cache_key] = entry
            while len(self._files) > self._cache_runs * 3:
                self._files.popitem(last=False)
        return entry

    def _run_file(self, run_id: str, table: str) -> Path:
        """The path of one of an indexed run's files; RunDataMissing when something other than a plain file in a
        plain folder sits there (a symlink out of the store, a FIFO that would block every reader)."""
        path = run_dir(self.root, self._indexed(run_id)) / RUN_FILES[table]
        if _not_plain(path):
            raise RunDataMissing(f"run {run_id}: its {path.name} is not a regular file inside the store")
        return path

    def _read_rows(self, run_id: str, table: str, step: int | None, columns: list[str]) -> pa.Table:
        """Rows of one step (or all steps), reading only the row groups that can hold them."""
        pf, ranges = self._file(run_id, table)
        if step is not None and (isinstance(step, bool) or not isinstance(step, int | np.integer)):
            raise StoreError(f"run {run_id}: a step is a whole number (or None for all steps), not {str(step)[:40]!r}")
        if step is not None and not -(2**31) <= step < 2**31:
            step = 2**31 - 1  # past every stored step (int32): no rows, the caller says which steps there are
        groups = [i for i, (lo, hi) in enumerate(ranges) if step is None or lo <= step <= hi]
        try:
            data = pf.read_row_groups(groups, columns=columns) if groups else pf.schema_arrow.empty_table()
        except (OSError, pa.ArrowException) as exc:
            raise RunDataMissing(f"run {run_id}: {RUN_FILES[table]} is unreadable ({exc})") from exc
        if step is not None and data.num_rows:
            data = data.filter(pc.equal(data.column("step_index"), step))
        return data.select(columns)

    def steps(self, run_id: str) -> list[int]:
        """Step indices stored for the run."""
        return list(range(int(self.run(run_id)["steps"])))

    def _cross_columns(self, run_id: str) -> set[str]:
        """Columns this run's cross_attention file has (runs written before schema 1.2 lack the DAAM ones)."""
        return set(self._file(run_id, "cross_attention")[0].schema_arrow.names)

    def _daam_columns(self, run_id: str) -> list[str]:
        """The columns holding the run's DAAM maps: codes and scale (schema 1.8 on), float32 (1.2-1.7), or none."""
        names = self._cross_columns(run_id)
        if {"daam_codes", "daam_scale"} <= names:
            return ["daam_codes", "daam_scale"]
        return ["daam_map"] if "daam_map" in names else []

    def cross_maps(
        self,
        run_id: str,
        token_indices: list[int],
        step: int | None = None,
        levels: list[str] | None = ALL_LEVELS,
    ) -> dict[str, np.ndarray]:
        """level -> (steps, tokens, h, w) float32 maps for the given tokens; all steps when step=None.

        levels=None gives every stored level ('HxW', 'mid-HxW'); ask for 'all' to get the stored DAAM map.
        """
        tokens = list(token_indices)
        ok = TEXT_SHARE_TOKEN  # -1: a DiT run's text share is stored as a token row
        if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) and ok <= t < 2**31 for t in tokens):
            raise StoreError(f"run {run_id}: token indices are whole numbers from 0 (or {ok}, the text share)")
        pos = {t: i for i, t in enumerate(tokens)}
        wanted = [lv for lv in levels or [] if lv != ALL]
        daam_columns = self._daam_columns(run_id)
        if levels is not None and ALL in levels and not daam_columns:
            raise StoreError(self._before_daam(run_id))
        columns = ["step_index", "token_index", "level", "level_height", "level_width", "map"]
        table = self._read_rows(run_id, "cross_attention", step, columns + daam_columns)
        keep = pc.is_in(table.column("token_index"), pa.array(tokens, pa.int32()))
        if levels is None:
            keep = pc.and_(keep, pc.not_equal(table.column("level"), ALL))
        else:
            keep = pc.and_(keep, pc.is_in(table.column("level"), pa.array(list(levels), pa.string())))
        table = table.filter(keep)
        if table.num_rows == 0:
            if step is not None and step not in self.steps(run_id):
                raise StoreError(f"run {run_id} has steps 0-{len(self.steps(run_id)) - 1}; no step {step}")
            listing = ", ".join(self.run(run_id)["levels"])
            raise StoreError(f"run {run_id} has no maps for levels {', '.join(wanted) or ALL}; its levels: {listing}")
        step_col = table.column("step_index").to_numpy()
        tok_col = table.column("token_index").to_numpy()
        lvl_col = np.asarray(table.column("level").to_pylist())
        step_ids = sorted(set(step_col.tolist()))
        step_pos = {s: i for i, s in enumerate(step_ids)}
        out: dict[str, np.ndarray] = {}
        for level in dict.fromkeys(lvl_col.tolist()):
            idx = np.flatnonzero(lvl_col == level)
            h = int(table.column("level_height")[int(idx[0])].as_py())
            w = int(table.column("level_width")[int(idx[0])].as_py())
            maps_col = table.column(daam_columns[0] if level == ALL else "map").take(pa.array(idx)).combine_chunks()
            flat = maps_col.flatten().to_numpy(zero_copy_only=False)
            if h <= 0 or w <= 0 or flat.size != len(idx) * h * w:  # checked before allocating (h, w) maps
                raise RunDataMissing(f"run {run_id}: its {level} maps don't match their stored size {h}x{w}")
            if level == ALL and daam_columns[0] == "daam_codes":
                scales = table.column("daam_scale").take(pa.array(idx)).to_numpy(zero_copy_only=False)
                flat = decode_maps(scales, flat.reshape(len(idx), h * w))
            flat = flat.astype(np.float32, copy=False)
            arr = np.zeros((len(step_ids), len(tokens), h, w), dtype=np.float32)
            arr[[step_pos[s] for s in step_col[idx]], [pos[t] for t in tok_col[idx]]] = flat.reshape(len(idx), h, w)
            out[level] = arr
        missing = [lv for lv in wanted if lv not in out]
        if missing:
            listing = ", ".join(self.run(run_id)["levels"])
            raise StoreError(f"run {run_id} has no level {', '.join(missing)}; its levels: {listing}")
        return out

    def _before_daam(self, run_id: str) -> str:
        return (
            f"run {run_id} was written before trace schema 1.2 and holds no DAAM map or head counts: "
            f"`stepx index rebuild --store {shlex.quote(str(self.root))}` upgrades it where its model is "
            "available (else regenerate it); aggregation='equal_levels' reads it as stored"
        )

    def level_counts(self, run_id: str) -> dict[str, int]:
        """layers x heads of each stored level ('HxW', 'mid-HxW'): how much it weighs in a word map."""
        if "head_count" not in self._cross_columns(run_id):
            raise StoreError(self._before_daam(run_id))
        table = self._read_rows(run_id, "cross_attention", 0, ["step_index", "level", "layer_count", "head_count"])
        counts: dict[str, int] = {}
        for level, layers, heads in zip(
            *(table.column(c).to_pylist() for c in ("level", "layer_count", "head_count")), strict=True
        ):
            if level != ALL:
                counts[level] = int(layers) * int(heads)
        return counts

    def _combined(
        self, run_id: str, tokens: list[int], step: int | None, levels: list[str] | None, aggregation: str | None
    ) -> np.ndarray:
        """(steps, tokens, H, W) maps on the latent grid under a named aggregation (schema.maps.AGGREGATIONS)."""
        name = aggregation or ("levels" if levels else DEFAULT_AGGREGATION)
        try:
            check_aggregation(name, levels)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        if name == DEFAULT_AGGREGATION:
            return self.cross_maps(run_id, tokens, step, [ALL])[ALL]
        run = self.run(run_id)
        maps = self.cross_maps(run_id, tokens, step, levels)
        counts = dict.fromkeys(maps, 1) if name == "equal_levels" else self.level_counts(run_id)
        try:
            weights = level_weights(name, counts, levels)
        except ValueError as exc:
            raise StoreError(f"run {run_id}: {exc}") from None
        return combine_levels(maps, weights, run["latent_height"], run["latent_width"])

    def word_map(
        self,
        run_id: str,
        word: str | int,
        step: int | None = None,
        levels: list[str] | None = ALL_LEVELS,
        aggregation: str | None = None,
        encoder: str | None = None,
    ) -> np.ndarray:
        """A word's (or Global's) map on the latent grid: its tokens' maps averaged, the steps summed.

        The default is DAAM's formula (schema.maps; for a DiT the mean of every band's (layer, head) maps); an
        `aggregation` names another of schema.maps.AGGREGATIONS (not DAAM), and giving `levels` (resolution
        levels, or a DiT's block bands) alone means aggregation 'levels'. `encoder` picks SD3's CLIP or T5 tokens.
        """
        tokens = self.resolve_word(run_id, word, encoder)
        return self._combined(run_id, tokens, step, levels, aggregation).mean(axis=1).sum(axis=0)

    def text_share(self, run_id: str, step: int | None = None, levels: list[str] | None = ALL_LEVELS) -> np.ndarray:
        """A DiT run's text share on the token grid: the part of each pixel's attention that goes to any text key
        (mean over the chosen bands' (layer, head) maps; steps averaged, or one step). Not a probability map."""
        if not any(t["kind"] == "text_share" for t in self.tokens(run_id)):
            raise StoreError(f"run {run_id} has no text share (only diffusion-transformer runs store one)")
        return self._combined(run_id, [TEXT_SHARE_TOKEN], step, levels, None)[:, 0].mean(axis=0)

    def token_maps(
        self, run_id: str, levels: list[str] | None = ALL_LEVELS, aggregation: str | None = None
    ) -> tuple[list[int], np.ndarray]:
        """(stored token indices, (steps, tokens, H, W) maps on the latent grid), DAAM's unless asked otherwise."""
        tokens = [t["token_index"] for t in self.tokens(run_id) if t["has_map"]]
        return tokens, self._combined(run_id, tokens, None, levels, aggregation)

    def self_attention(self, run_id: str, step: int | None = None) -> SelfAttention:
        """The step-aggregated self-attention (step=None) or one step's, decoded (schema.codec)."""
        kind = "aggregate" if step is None else "step"
        table = self._read_rows(
            run_id,
            "self_attention",
            -1 if step is None else step,
            ["kind", "step_index", "grid_height", "grid_width", "row_scale", "values"],
        )
        table = table.filter(pc.equal(table.column("kind"), kind))
        if table.num_rows == 0:
            raise StoreError(
                f"run {run_id} has no self-attention for {'all steps' if step is None else f'step {step}'}"
            )
        row = {c: table.column(c)[0].as_py() for c in ("grid_height", "grid_width", "step_index")}
        grid = (row["grid_height"], row["grid_width"])
        n = grid[0] * grid[1]
        scale = table.column("row_scale")[0].values.to_numpy()
        if grid[0] <= 0 or grid[1] <= 0 or len(scale) != n:  # checked before decoding an (n, n) matrix
            raise RunDataMissing(f"run {run_id}: its self-attention doesn't match its stored grid {grid[0]}x{grid[1]}")
        try:
            matrix = decode_rows(scale, table.column("values")[0].as_buffer(), (n, n))
        except ValueError as exc:
            raise RunDataMissing(f"run {run_id}: its self-attention values are damaged ({exc})") from None
        return SelfAttention(grid, matrix, kind, row["step_index"])

    def depth(self, run_id: str) -> tuple[np.ndarray, dict] | None:
        """The run's depth estimate ((height, width) float32, info) or None when none was computed."""
        path = self._run_file(run_id, "depth")
        try:
            pf = pq.ParquetFile(path)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise RunDataMissing(f"run {run_id}: depth.parquet is unreadable ({exc})") from exc
        check_version(pf.schema_arrow.metadata, where=f"run {run_id}")
        try:
            row = pf.read().to_pylist()[0]
            depth = np.asarray(row.pop("map"), dtype=np.float32).reshape(row["height"], row["width"])
        except (IndexError, KeyError, TypeError, ValueError, pa.ArrowException) as exc:
            raise RunDataMissing(f"run {run_id}: depth.parquet is damaged ({str(exc)[:80]})") from None
        return depth, row

    def _probe_table(self, run_id: str) -> pa.Table | None:
        path = self._run_file(run_id, "probe_maps")
        try:
            pf = pq.ParquetFile(path)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise RunDataMissing(f"run {run_id}: probe_maps.parquet is unreadable ({exc})") from exc
        check_version(pf.schema_arrow.metadata, where=f"run {run_id}")
        return pf.read()

    def probes(self, run_id: str) -> list[str]:
        """The probe texts stored beside a run (`stepx probe`), in the order they were probed."""
        table = self._probe_table(run_id)
        return [] if table is None else list(dict.fromkeys(table.column("probe").to_pylist()))

    def probe_embeddings(self, run_id: str) -> dict[str, str | None]:
        """Per stored probe text, how its words were embedded: 'optimised' (a fitted OVAM token), 'encoded', or
        None (a probe file older than schema 1.7)."""
        table = self._probe_table(run_id)
        if table is None:
            return {}
        kinds = table.column("probe_embedding").to_pylist() if "probe_embedding" in table.column_names else []
        return dict(zip(table.column("probe").to_pylist(), kinds or [None] * table.num_rows, strict=True))

    def probe_map(self, run_id: str, probe: str, word: str | None = None, step: int | None = None) -> np.ndarray:
        """A probe's map on the latent grid, as `word_map` builds a word's: its word tokens' DAAM maps averaged,
        the steps summed (or one step). `word` picks one word of a several-word probe text."""
        table = self._probe_table(run_id)
        if table is None:
            raise StoreError(f"run {run_id} has no probe maps (run `stepx probe {run_id} --words ...`)")
        rows = [
            r
            for r in table.to_pylist()
            if r["probe"] == probe and r["token_kind"] == "word" and (word is None or r["word"] == word)
        ]
        rows = [r for r in rows if step is None or r["step_index"] == step]
        if not rows:
            raise WordNotFound(f"run {run_id} has no probe {probe!r}" + (f" word {word!r}" if word else ""))
        shape = (rows[0]["map_height"], rows[0]["map_width"])
        steps: dict[int, list[np.ndarray]] = {}
        try:
            for r in rows:
                steps.setdefault(r["step_index"], []).append(np.asarray(r["daam_map"], dtype=np.float32).reshape(shape))
        except (TypeError, ValueError) as exc:
            raise RunDataMissing(f"run {run_id}: probe_maps.parquet is damaged ({str(exc)[:80]})") from None
        return np.sum([np.mean(maps, axis=0) for maps in steps.values()], axis=0)

    def concepts(self, run_id: str) -> list[str]:
        """The ConceptAttention concepts stored for a run, in order ([] when it has none)."""
        if not (run_dir(self.root, self._indexed(run_id)) / RUN_FILES["concept_maps"]).is_file():
            return []
        return self.concept_maps(run_id)[0]

    def concept_maps(self, run_id: str, step: int | None = None) -> tuple[list[str], np.ndarray]:
        """A FLUX.1 run's ConceptAttention maps (not cross-attention): (concepts, (concepts, h, w) float32), the
        steps averaged (step=None) or one step's; a pixel's maps sum to 1 over the concepts."""
        path = self._run_file(run_id, "concept_maps")
        try:
            pf = pq.ParquetFile(path)
        except FileNotFoundError:
            raise StoreError(f"run {run_id} has no ConceptAttention maps (only FLUX.1 runs with concepts)") from None
        except (OSError, pa.ArrowException) as exc:
            raise RunDataMissing(f"run {run_id}: concept_maps.parquet is unreadable ({exc})") from exc
        check_version(pf.schema_arrow.metadata, where=f"run {run_id}")
        rows = pf.read(columns=["concept_index", "concept", "step_index", "map_height", "map_width", "map"]).to_pylist()
        if step is not None:
            rows = [r for r in rows if r["step_index"] == step]
            if not rows:
                raise StoreError(f"run {run_id} has no ConceptAttention maps for step {step}")
        names = dict(sorted({r["concept_index"]: r["concept"] for r in rows}.items()))
        h, w = rows[0]["map_height"], rows[0]["map_width"]
        out = np.zeros((len(names), h, w), np.float32)
        counts = np.zeros(len(names))
        for r in rows:
            out[r["concept_index"]] += np.asarray(r["map"], np.float32).reshape(h, w)
            counts[r["concept_index"]] += 1
        return list(names.values()), out / counts[:, None, None].astype(np.float32)

    def image(self, run_id: str, step: int | None = None) -> tuple[bytes, str]:
        """(encoded bytes, format) of the final image (step=None) or one step's preview."""
        kind = "final" if step is None else "preview"
        table = self._read_rows(
            run_id, "images", -1 if step is None else step, ["kind", "step_index", "data", "format"]
        )
        table = table.filter(pc.equal(table.column("kind"), kind))
        if table.num_rows == 0:
            raise StoreError(f"run {run_id} has no {'final image' if step is None else f'preview for step {step}'}")
        return table.column("data")[0].as_py(), table.column("format")[0].as_py()

    # -- SQL ------------------------------------------------------------------------------
    def sql(
        self,
        query: str,
        max_rows: int = Limits.max_rows,
        timeout_s: float = Limits.timeout_s,
        memory_limit_mb: int = Limits.memory_limit_mb,
    ) -> Results:
        """Run one read-only SELECT in its own throwaway sandbox (see store.sql); QueryError when refused or stopped."""
        limits = Limits(timeout_s=timeout_s, max_rows=max_rows, memory_limit_mb=memory_limit_mb)
        sources, views = self.sql_sources()
        return run_query(sources, views, query, limits)

    def sql_sources(self) -> tuple[dict[str, Source], dict[str, str]]:
        """What the SQL console shows: each table's Parquet files (the same as the views') and the SQL-defined views."""
        sources = {table: Source(tuple(paths), TABLES[table]) for table, paths in self._checked_files().items()}
        return sources, {"word_stats": WORD_STATS_SQL, "daam_maps": DAAM_MAPS_SQL}
