"""The generation queue: a SQLite file in the store (`jobs/queue.sqlite`) that the dashboard writes
requests into and `stepx worker` takes them from. Torch-free; both sides import it.

SQLite in WAL mode lets many submitters and one worker work at once; every state change is one
short transaction. A job's states: queued -> running -> done | failed, and queued -> cancelled or
running -> cancelling -> cancelled by `cancel`. Requests are checked against the per-model limits
when submitted, and again when claimed (a row written by hand or by an older version fails alone,
with a message, and the worker goes on). Each job gets its run id when it is queued, so a retried
job writes the same run, never a second one. A worker is alive while it beats (a thread, also during
a job); a running job whose heartbeat is older than HEARTBEAT_STALE_S is retried once, then failed.
Liveness is never judged by PID: PIDs repeat, in containers above all.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from schema.layout import valid_run_id
from schema.limits import check_generation, check_prompt

MAX_ATTEMPTS = 2  # a job whose worker dies is retried once
BEAT_S = 2.0  # a worker records itself (and its job) this often, from a thread
WORKER_ALIVE_S = 15.0  # a worker that hasn't beaten for this long is gone
HEARTBEAT_STALE_S = 60.0  # a running job without a heartbeat for this long has lost its worker
ACTIVE = ("running", "cancelling")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,          -- unix seconds
    status TEXT NOT NULL,              -- queued | running | cancelling | cancelled | done | failed
    request TEXT NOT NULL,             -- JSON: prompt, negative, model, seed, steps, guidance, width, height
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,                -- for people reading the table; never used to judge liveness
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    run_id TEXT,                       -- the run this job writes, fixed when it is queued
    error TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    pid INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    device TEXT
);
"""


class QueueDamaged(sqlite3.DatabaseError):
    """The queue file can't be opened as a queue (not a database, a folder, a FIFO); one line saying what to do."""


class JobError(ValueError):
    """A queue request that can't be carried out (unknown job, unusable request); one line for the user."""


@dataclass
class Job:
    """One row of the queue (numbers that the row holds as text read as None)."""

    job_id: int
    created_at: float
    status: str
    request: dict
    attempts: int
    worker_pid: int | None
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    step: int
    total_steps: int | None
    run_id: str | None
    error: str | None
    position: int | None = None  # 1 = next to run; None unless queued

    def elapsed_s(self, now: float | None = None) -> float | None:
        """Seconds the job has run (so far, or in all when finished); None when it never started."""
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else (now or time.time())
        return max(0.0, end - self.started_at)

    def waited_s(self, now: float | None = None) -> float:
        """Seconds between queueing and starting (or now, while queued)."""
        start = self.started_at if self.started_at is not None else (now or time.time())
        return max(0.0, start - self.created_at)


def queue_path(store: Path) -> Path:
    return Path(store) / "jobs" / "queue.sqlite"


@contextmanager
def connect(store: Path) -> Iterator[sqlite3.Connection]:
    """A short-lived connection to the queue (created on first use)."""
    path = queue_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_file():
        raise QueueDamaged(f"the job queue {path} is not a file; move it away to start a new queue")
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise QueueDamaged(
                f"the job queue {path} can't be read ({exc}); move it away to start a new queue"
            ) from None
        yield con
    finally:
        con.close()


def _num(v: object) -> float | None:
    """A REAL column's value, or None when the row holds something else (text, NaN)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: object) -> int | None:
    n = _num(v)
    return int(n) if n is not None and n == int(n) else None


def _request(text: object) -> dict:
    """The request JSON as a dict; JobError when it is not a JSON object."""
    if not isinstance(text, str | bytes):
        raise JobError("the request is not JSON text")
    try:
        req = json.loads(text)
    except (ValueError, RecursionError):
        raise JobError("the request is not valid JSON") from None
    if not isinstance(req, dict):
        raise JobError("the request is not a JSON object")
    return req


COLUMNS = (
    "job_id, created_at, status, request, attempts, worker_pid, started_at, finished_at, heartbeat_at, step, "
    "total_steps, run_id, error, CASE WHEN status = 'queued' THEN 1 + (SELECT count(*) FROM jobs AS ahead "
    "WHERE ahead.status = 'queued' AND ahead.job_id < jobs.job_id) END"
)


def _job(row: tuple) -> Job:
    """A row as a Job, leniently: listing must never fail on a malformed row."""
    job_id, created, status, request, attempts, pid, started, finished, beat, step, total, run_id, error, pos = row
    try:
        req = _request(request)
    except JobError as exc:
        req, error = {}, error or f"unusable job row: {exc}"
    return Job(
        job_id=int(job_id),
        created_at=_num(created) or 0.0,
        status=str(status),
        request=req,
        attempts=_int(attempts) or 0,
        worker_pid=_int(pid),
        started_at=_num(started),
        finished_at=_num(finished),
        heartbeat_at=_num(beat),
        step=_int(step) or 0,
        total_steps=_int(total),
        run_id=run_id if valid_run_id(run_id) else None,
        error=None if error is None else str(error),
        position=_int(pos),
    )


def probe_words(text: str) -> list[str]:
    """Comma-separated probe texts ("dog, sky"), stripped, empty ones dropped, each once."""
    return list(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))


# The fields each kind of request may hold: anything else (a 50 MB blob, a run_id the queue sets itself, nesting
# deep enough to break json.dumps) is refused before it is stored.
FIELDS = {
    "generate": {"kind", "prompt", "negative", "model", "seed", "steps", "guidance", "width", "height", "tags"},
    "depth": {"kind", "run_id", "depth_model", "prompt"},
    "probe": {"kind", "run_id", "words"},
}
MAX_TAGS, MAX_TAG_CHARS = 32, 100  # tags are shown on every gallery card
MAX_PROBES = 64  # each probe text is encoded and traced through every layer


def _check_texts(what: str, texts: object, most: int, chars: int) -> None:
    """JobError unless `texts` is a list of 1..`most` non-empty one-line strings of at most `chars` characters."""
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise JobError(f"{what} is not a list of text")
    if len(texts) > most:
        raise JobError(f"{what} has {len(texts):,} entries; the limit is {most}")
    for t in texts:
        if len(t) > chars or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in t):
            raise JobError(f"{what} holds an entry longer than {chars:,} characters or with control characters")


def _check_id(job_id: object) -> int:
    """A job id as SQLite can hold it; JobError (no such job) for anything else."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not -(2**63) <= job_id < 2**63:
        raise JobError(f"no job {str(job_id)[:40]} in the queue")
    return job_id


def check_request(req: dict) -> dict:
    """The request with its fields checked (types, the model's limits); JobError names the first problem."""
    if not isinstance(req, dict):
        raise JobError("the request is not a JSON object")
    kind = req.get("kind", "generate")
    if kind in FIELDS:
        unknown = [k for k in req if k not in FIELDS[kind]]
        if unknown:
            raise JobError(f"the {kind} request has an unknown field {str(unknown[0])[:40]!r}")
    if kind == "depth":
        if not valid_run_id(req.get("run_id")):
            raise JobError(f"the depth request names no valid run id ({req.get('run_id')!r})")
        if not isinstance(req.get("depth_model", "zoedepth"), str):
            raise JobError("depth_model is not text")
        return req
    if kind == "probe":
        if not valid_run_id(req.get("run_id")):
            raise JobError(f"the probe request names no valid run id ({req.get('run_id')!r})")
        words = req.get("words")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise JobError("words is not a list of probe words")
        if len(words) > MAX_PROBES:
            raise JobError(f"words has {len(words):,} probes; the limit is {MAX_PROBES}")
        try:
            for w in words:
                check_prompt(w, "")
        except ValueError as exc:
            raise JobError(str(exc)) from None
        return req
    if kind != "generate":
        raise JobError(f"unknown job kind {kind!r}")
    for key in ("prompt", "model"):
        if key not in req:
            raise JobError(f"the request has no {key!r}")
    if not isinstance(req["model"], str) or not req["model"].strip():
        raise JobError("the request's model is not a model name")
    if req.get("tags"):
        _check_texts("tags", req["tags"], MAX_TAGS, MAX_TAG_CHARS)
    elif req.get("tags", []) != []:
        raise JobError("tags is not a list of text")
    try:
        check_prompt(req["prompt"], req.get("negative", ""))
        check_generation(
            req["model"], req.get("steps"), req.get("height"), req.get("width"), req.get("seed", 0), req.get("guidance")
        )
    except ValueError as exc:
        raise JobError(str(exc)) from None
    return req


def new_job_run_id(now: float | None = None) -> str:
    """A run id for a queued job (the same shape as every run id: UTC time plus 6 hex digits)."""
    return datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def submit(store: Path, request: dict) -> int:
    """Queue a request after checking it against the model's limits (JobError otherwise); returns its job id."""
    req = check_request(request)
    now = time.time()
    run_id = req["run_id"] if req.get("kind") in ("depth", "probe") else new_job_run_id(now)
    with connect(store) as con:
        cur = con.execute(
            "INSERT INTO jobs (created_at, status, request, total_steps, run_id) VALUES (?, 'queued', ?, ?, ?)",
            (now, json.dumps(req), _int(req.get("steps")), run_id),
        )
        return int(cur.lastrowid)


def get(store: Path, job_id: int) -> Job | None:
    """One job, or None when there is none with that id."""
    try:
        _check_id(job_id)
    except JobError:
        return None
    with connect(store) as con:
        row = con.execute(f"SELECT {COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return _job(row) if row else None


def recent(store: Path, limit: int = 20) -> list[Job]:
    """Newest jobs first."""
    if not queue_path(store).exists():
        return []
    with connect(store) as con:
        rows = con.execute(f"SELECT {COLUMNS} FROM jobs ORDER BY job_id DESC LIMIT ?", (limit,)).fetchall()
    return [_job(r) for r in rows]


def position(store: Path, job_id: int) -> int | None:
    """Where a queued job stands (1 = next to run); None when it is not queued."""
    job = get(store, job_id)
    return job.position if job else None


def recover(store: Path, force: bool = False) -> list[int]:
    """Requeue (or fail, after MAX_ATTEMPTS) running jobs whose heartbeat is stale; returns their ids.

    force treats every running job as orphaned: right for a worker that just took the store's worker
    lock, since no other worker can be running them (even one that had the same PID).
    """
    now = time.time()
    touched = []
    with connect(store) as con:
        con.execute("BEGIN IMMEDIATE")
        rows = con.execute("SELECT job_id, status, heartbeat_at, attempts FROM jobs WHERE status IN (?, ?)", ACTIVE)
        for job_id, status, beat, attempts in rows.fetchall():
            beat, attempts = _num(beat), _int(attempts) or 0
            if not force and beat is not None and now - beat <= HEARTBEAT_STALE_S:
                continue
            if status == "cancelling":
                new, error = "cancelled", "cancelled while running"
            elif attempts >= MAX_ATTEMPTS:
                new, error = "failed", f"the worker stopped during this job {attempts} times; giving up"
            else:
                new, error = "queued", None
            con.execute(
                "UPDATE jobs SET status = ?, error = ?, worker_pid = NULL, step = 0, "
                "finished_at = CASE WHEN ? = 'queued' THEN NULL ELSE ? END WHERE job_id = ?",
                (new, error, new, now, job_id),
            )
            touched.append(job_id)
        con.execute("COMMIT")
    return touched


def claim(store: Path, pid: int | None = None) -> Job | None:
    """Take the oldest queued job whose request is usable (atomically), or None.

    Rows that can't run (request not JSON, missing keys, past the limits, numbers stored as text) are
    marked failed with the reason on the way, so a bad row never blocks the good ones behind it.
    """
    now = time.time()
    with connect(store) as con:
        con.execute("BEGIN IMMEDIATE")
        while True:
            row = con.execute(
                "SELECT job_id, request, attempts, run_id FROM jobs WHERE status = 'queued' ORDER BY job_id LIMIT 1"
            ).fetchone()
            if row is None:
                con.execute("COMMIT")
                return None
            job_id, request, attempts, run_id = row
            try:
                req = check_request(_request(request))
                if req.get("kind") in ("depth", "probe"):
                    run_id = req["run_id"]
                elif run_id is None:
                    run_id = new_job_run_id(now)  # queued by an older version: fixed now, before any attempt
                elif not valid_run_id(run_id):
                    raise JobError(f"its run_id {str(run_id)[:40]!r} is not a run id")
            except JobError as exc:
                con.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE job_id = ?",
                    (now, f"unusable job: {exc}", job_id),
                )
                continue
            con.execute(
                "UPDATE jobs SET status = 'running', attempts = ?, worker_pid = ?, started_at = ?, "
                "heartbeat_at = ?, step = 0, total_steps = ?, run_id = ?, error = NULL, finished_at = NULL "
                "WHERE job_id = ?",
                ((_int(attempts) or 0) + 1, pid or os.getpid(), now, now, _int(req.get("steps")), run_id, job_id),
            )
            con.execute("COMMIT")
            break
    return get(store, job_id)


def progress(store: Path, job: Job, step: int, total: int) -> bool:
    """Record a job's step (and heartbeat); False when the job was cancelled or is no longer this attempt's."""
    with connect(store) as con:
        cur = con.execute(
            "UPDATE jobs SET step = ?, total_steps = ?, heartbeat_at = ? "
            "WHERE job_id = ? AND attempts = ? AND status = 'running'",
            (step, total, time.time(), job.job_id, job.attempts),
        )
        return cur.rowcount == 1


def beat_job(store: Path, job: Job) -> None:
    """Refresh a running job's heartbeat (the worker's heartbeat thread, between steps too)."""
    with connect(store) as con:
        con.execute(
            "UPDATE jobs SET heartbeat_at = ? WHERE job_id = ? AND attempts = ? AND status IN (?, ?)",
            (time.time(), job.job_id, job.attempts, *ACTIVE),
        )


def wanted(store: Path, job: Job) -> bool:
    """Whether this attempt of the job should still go on (not cancelled, not recovered by another)."""
    with connect(store) as con:
        row = con.execute("SELECT status, attempts FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
    return row is not None and row[0] == "running" and _int(row[1]) == job.attempts


def finish(store: Path, job: Job, run_id: str | None = None, error: str | None = None, cancelled: bool = False) -> None:
    """Mark this attempt of a job done (with its run), failed (with the reason) or cancelled."""
    status = "cancelled" if cancelled else "failed" if error else "done"
    with connect(store) as con:
        con.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, run_id = coalesce(?, run_id), error = ? "
            "WHERE job_id = ? AND attempts = ? AND status IN (?, ?)",
            (status, time.time(), run_id, error, job.job_id, job.attempts, *ACTIVE),
        )


def cancel(store: Path, job_id: int) -> str:
    """Cancel a job: a queued one at once, a running one at its worker's next step; returns the new status.

    JobError when there is no such job or it has already finished (its status is in the message).
    """
    _check_id(job_id)
    now = time.time()
    with connect(store) as con:
        con.execute("BEGIN IMMEDIATE")
        row = con.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        status = None if row is None else row[0]
        if status == "queued":
            status = "cancelled"
            con.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE job_id = ?",
                (status, now, "cancelled before it started", job_id),
            )
        elif status == "running":
            status = "cancelling"
            con.execute("UPDATE jobs SET status = ? WHERE job_id = ?", (status, job_id))
        con.execute("COMMIT")
    if status is None:
        raise JobError(f"no job {job_id} in the queue")
    if status not in ("cancelled", "cancelling"):
        raise JobError(f"job {job_id} has already finished ({status}); nothing to cancel")
    return status


def worker_beat(store: Path, pid: int, started_at: float, device: str) -> None:
    """Record that this worker process is alive (its row is keyed by PID only for display)."""
    with connect(store) as con:
        con.execute(
            "INSERT INTO workers (pid, started_at, heartbeat_at, device) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (pid) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, started_at = excluded.started_at, "
            "device = excluded.device",
            (pid, started_at, time.time(), device),
        )


def live_worker(store: Path) -> dict | None:
    """A worker that beat within WORKER_ALIVE_S, if any (its beat comes from a thread, during jobs too)."""
    if not queue_path(store).exists():
        return None
    with connect(store) as con:
        rows = con.execute("SELECT pid, heartbeat_at, device FROM workers").fetchall()
    now = time.time()
    beats = [(_num(b), p, d) for p, b, d in rows]
    alive = [(b, p, d) for b, p, d in beats if b is not None and now - b < WORKER_ALIVE_S]
    if not alive:
        return None
    beat, pid, device = max(alive, key=lambda r: r[0])
    return {"pid": _int(pid), "heartbeat_at": beat, "device": device}
