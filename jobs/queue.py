"""The generation queue: a SQLite file in the store (`jobs/queue.sqlite`) that the dashboard writes
requests into and `stepx worker` takes them from. Torch-free; both sides import it.

SQLite in WAL mode lets many submitters and one worker work at once; every state change is one
short transaction. A job is retried once when its worker dies mid-run, then marked failed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from schema.layout import pid_alive

MAX_ATTEMPTS = 2  # a job whose worker dies is retried once
HEARTBEAT_STALE_S = 120.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,          -- unix seconds
    status TEXT NOT NULL,              -- queued | running | done | failed
    request TEXT NOT NULL,             -- JSON: prompt, negative, model, seed, steps, guidance, width, height
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    run_id TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    pid INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    device TEXT
);
"""


@dataclass
class Job:
    """One row of the queue."""

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


def queue_path(store: Path) -> Path:
    return Path(store) / "jobs" / "queue.sqlite"


@contextmanager
def connect(store: Path) -> Iterator[sqlite3.Connection]:
    """A short-lived connection to the queue (created on first use)."""
    path = queue_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=30000")
        con.executescript(SCHEMA)
        yield con
    finally:
        con.close()


def _job(row: tuple) -> Job:
    values = list(row)
    values[3] = json.loads(values[3])
    return Job(*values)


COLUMNS = ("job_id, created_at, status, request, attempts, worker_pid, started_at, finished_at, heartbeat_at, "
           "step, total_steps, run_id, error")  # fmt: skip


def submit(store: Path, request: dict) -> int:
    """Queue a generation request; returns its job id."""
    with connect(store) as con:
        cur = con.execute(
            "INSERT INTO jobs (created_at, status, request, total_steps) VALUES (?, 'queued', ?, ?)",
            (time.time(), json.dumps(request), request.get("steps")),
        )
        return int(cur.lastrowid)


def get(store: Path, job_id: int) -> Job | None:
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


def recover(store: Path) -> list[int]:
    """Requeue (or fail, after MAX_ATTEMPTS) running jobs whose worker is gone; returns their ids."""
    now = time.time()
    touched = []
    with connect(store) as con:
        con.execute("BEGIN IMMEDIATE")
        rows = con.execute("SELECT job_id, worker_pid, heartbeat_at, attempts FROM jobs WHERE status = 'running'")
        for job_id, pid, beat, attempts in rows.fetchall():
            stale = beat is None or now - beat > HEARTBEAT_STALE_S
            if pid == os.getpid() or (pid_alive(pid) and not stale):
                continue
            if attempts >= MAX_ATTEMPTS:
                con.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE job_id = ?",
                    (now, f"the worker stopped during this job {attempts} times; giving up", job_id),
                )
            else:
                con.execute(
                    "UPDATE jobs SET status = 'queued', worker_pid = NULL, step = 0 WHERE job_id = ?", (job_id,)
                )
            touched.append(job_id)
        con.execute("COMMIT")
    return touched


def claim(store: Path) -> Job | None:
    """Take the oldest queued job for this process (atomically), or None."""
    now = time.time()
    with connect(store) as con:
        con.execute("BEGIN IMMEDIATE")
        row = con.execute("SELECT job_id FROM jobs WHERE status = 'queued' ORDER BY job_id LIMIT 1").fetchone()
        if row is None:
            con.execute("COMMIT")
            return None
        con.execute(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, worker_pid = ?, started_at = ?, "
            "heartbeat_at = ?, step = 0 WHERE job_id = ?",
            (os.getpid(), now, now, row[0]),
        )
        con.execute("COMMIT")
    return get(store, row[0])


def progress(store: Path, job_id: int, step: int, total: int) -> None:
    with connect(store) as con:
        con.execute(
            "UPDATE jobs SET step = ?, total_steps = ?, heartbeat_at = ? WHERE job_id = ?",
            (step, total, time.time(), job_id),
        )


def finish(store: Path, job_id: int, run_id: str | None = None, error: str | None = None) -> None:
    """Mark a job done (with its run) or failed (with the reason)."""
    with connect(store) as con:
        con.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, run_id = ?, error = ? WHERE job_id = ?",
            ("failed" if error else "done", time.time(), run_id, error, job_id),
        )


def worker_beat(store: Path, device: str) -> None:
    """Record that this worker process is alive."""
    now = time.time()
    with connect(store) as con:
        con.execute(
            "INSERT INTO workers (pid, started_at, heartbeat_at, device) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (pid) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (os.getpid(), now, now, device),
        )


def live_worker(store: Path) -> dict | None:
    """A worker that beat recently and whose process exists, if any."""
    if not queue_path(store).exists():
        return None
    with connect(store) as con:
        rows = con.execute("SELECT pid, heartbeat_at, device FROM workers ORDER BY heartbeat_at DESC").fetchall()
    for pid, beat, device in rows:
        if pid_alive(pid) and time.time() - beat < HEARTBEAT_STALE_S:
            return {"pid": pid, "heartbeat_at": beat, "device": device}
    return None
