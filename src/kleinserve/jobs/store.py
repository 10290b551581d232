"""The job store: every accepted request, sync or async, is a row that survives a restart.

`JobStore` is the interface the worker and the API use; `SqliteJobStore` keeps it in
`<data dir>/kleinserve.db` (WAL mode). A shared database can replace it when several machines serve one queue:
nothing outside this module writes SQL. Reference images are not in the row: the submitter keeps them, as
prepared, as PNG files beside it (`inputs/<job id>-<i>.png`), so a job re-runs identically after a restart.

Job lifecycle: queued -> running -> succeeded | failed | cancelled. A job found `running` at start-up was
interrupted by a crash: it is queued again once, then failed with a reason.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import orjson

from kleinserve.errors import Conflict, NotFound, StoreUnavailable
from kleinserve.files import private_database
from kleinserve.jobs.record import JobParams, JobResult, JobUsage, from_json, to_json
from kleinserve.types import json_bytes

MAX_ATTEMPTS = 2  # the first run and one retry after a crash
# How long a statement waits for another connection's write lock before StoreUnavailable. Below the clients'
# patience: a locked store answers 503 in seconds rather than holding requests (and threads) for long.
BUSY_TIMEOUT_S = 5.0


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class Job:
    """One row. `params` is the request without its images, `result` a succeeded job's images and the
    parameters used, `usage` its metering (jobs/record.py); times are Unix seconds."""

    id: str
    owner: str
    status: JobStatus
    params: JobParams
    reference_count: int
    batch_key: str
    created: float
    started: float | None = None
    finished: float | None = None
    progress: float = 0.0
    attempts: int = 0
    error: str | None = None
    result: JobResult | None = None
    usage: JobUsage | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_status: str | None = None
    cancel_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Load(NamedTuple):
    """What the submit limits look at: queued jobs of all keys, and queued + running jobs of one key."""

    queued: int
    in_flight: int


class JobStore(Protocol):
    def add(self, job: Job) -> Job: ...
    def get(self, job_id: str, owner: str | None = None) -> Job: ...
    def owned(self, owner: str, status: JobStatus | None = None, limit: int = 50) -> list[Job]: ...
    def queued(self, limit: int = 1000) -> list[Job]: ...
    def mark_running(self, job_ids: list[str]) -> list[str]: ...
    def set_progress(self, job_id: str, progress: float) -> None: ...
    def finish(self, job_id: str, status: JobStatus, **fields: Any) -> Job: ...
    def request_cancel(self, job_id: str, owner: str) -> Job: ...
    def set_webhook_status(self, job_id: str, status: str) -> None: ...
    def load(self, owner: str) -> Load: ...
    def check_writable(self) -> None: ...
    def recover(self) -> list[Job]: ...
    def usage(self, owner: str | None = None, since: float | None = None) -> list[Job]: ...
    def close(self) -> None: ...
    def pending_webhooks(self) -> list[Job]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    reference_count INTEGER NOT NULL,
    batch_key TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    usage TEXT,
    webhook_url TEXT,
    webhook_secret TEXT,
    webhook_status TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created);
CREATE INDEX IF NOT EXISTS jobs_with_pending_webhook ON jobs (finished)
    WHERE webhook_url IS NOT NULL AND webhook_status IS NULL;
"""
_RECORD_COLUMNS: dict[str, type[JobParams | JobResult | JobUsage]] = {
    "params": JobParams,
    "result": JobResult,
    "usage": JobUsage,
}
_JSON_COLUMNS = (*_RECORD_COLUMNS, "extra")
_COLUMNS = (
    "id, owner, status, params, reference_count, batch_key, created, started, finished, progress, attempts, "
    "error, result, usage, webhook_url, webhook_secret, webhook_status, cancel_requested, extra"
)
_COLUMN_NAMES = tuple(name.strip() for name in _COLUMNS.split(","))


def new_job_id() -> str:
    """Unguessable: 128 random bits."""
    return secrets.token_hex(16)


class SqliteJobStore:
    """JobStore on one SQLite file; safe to call from any thread. Every call may block for up to
    `busy_timeout_s` (another process holds the write lock) and then raises StoreUnavailable, as it does for a
    full disk or an I/O error: callers on the event loop go through a thread.
    """

    def __init__(self, database: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self._db = sqlite3.connect(
            private_database(database), timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This connection for one thread at a time; SQLite's operational failures (locked, busy, disk full,
        I/O) as StoreUnavailable, which every layer above handles (503, a retried write, /readyz false)."""
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"the job store cannot be used right now ({exc})") from exc

    def check_writable(self) -> None:
        """Take and release the write lock (StoreUnavailable if another connection keeps it)."""
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    def add(self, job: Job) -> Job:
        row = _to_row(job)
        with self._locked():
            self._db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
        return job

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job; NotFound when it does not exist or belongs to another key."""
        with self._locked():
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            raise NotFound(f"no job {job_id!r}")
        return _from_row(row)

    def owned(self, owner: str, status: JobStatus | None = None, limit: int = 50) -> list[Job]:
        """`owner`'s jobs, newest first, optionally of one status."""
        query = f"SELECT {_COLUMNS} FROM jobs WHERE owner = ?"
        args: list[Any] = [owner]
        if status is not None:
            query += " AND status = ?"
            args.append(status.value)
        query += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        with self._locked():
            return [_from_row(row) for row in self._db.execute(query, args).fetchall()]

    def queued(self, limit: int = 1000) -> list[Job]:
        """Queued jobs, oldest first."""
        with self._locked():
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY created, id LIMIT ?", (limit,)
            ).fetchall()
        return [_from_row(row) for row in rows]

    def mark_running(self, job_ids: list[str]) -> list[str]:
        """Claim queued jobs for the engine; returns the ids claimed (one cancelled meanwhile is not)."""
        now = time.time()
        claimed = []
        with self._locked():
            for job_id in job_ids:
                cursor = self._db.execute(
                    "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, progress = 0 "
                    "WHERE id = ? AND status = 'queued'",
                    (now, job_id),
                )
                if cursor.rowcount:
                    claimed.append(job_id)
        return claimed

    def set_progress(self, job_id: str, progress: float) -> None:
        with self._locked():
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress, job_id))

    def finish(self, job_id: str, status: JobStatus, **fields: Any) -> Job:
        """Move a job to a terminal status, setting `error`, `result` (JobResult), `usage` (JobUsage) and
        `progress` as given."""
        sets = {"status": status.value, "finished": time.time(), **fields}
        if status is JobStatus.SUCCEEDED:
            sets["progress"] = 1.0
        values = [_stored(column, value) for column, value in sets.items()]
        with self._locked():
            rows = self._db.execute(  # fetched to the end: the statement (and its write) then completes
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ? RETURNING {_COLUMNS}",
                (*values, job_id),
            ).fetchall()
        if not rows:
            raise NotFound(f"no job {job_id!r}")
        return _from_row(rows[0])

    def request_cancel(self, job_id: str, owner: str) -> Job:
        """Queued: cancelled at once. Running: flagged (the worker stops it at the next step, unless it ends
        first). Finished: Conflict."""
        job = self.get(job_id, owner)
        if job.status.terminal:
            raise Conflict(f"job {job_id} has already ended ({job.status.value}): there is nothing to cancel")
        with self._locked():
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished = ?, error = 'cancelled by the client' "
                "WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            self._db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,)
            )
        return self.get(job.id)

    def set_webhook_status(self, job_id: str, status: str) -> None:
        with self._locked():
            self._db.execute("UPDATE jobs SET webhook_status = ? WHERE id = ?", (status, job_id))

    def load(self, owner: str) -> Load:
        with self._locked():
            queued, in_flight = self._db.execute(
                "SELECT COUNT(*) FILTER (WHERE status = 'queued'), COUNT(*) FILTER (WHERE owner = ?) "
                "FROM jobs WHERE status IN ('queued', 'running')",
                (owner,),
            ).fetchone()
        return Load(int(queued), int(in_flight))

    def recover(self) -> list[Job]:
        """After a crash: jobs left running are queued again, or failed after MAX_ATTEMPTS; returns them."""
        with self._locked():
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status = 'running'").fetchall()
            for row in rows:
                job = _from_row(row)
                if job.attempts >= MAX_ATTEMPTS or job.cancel_requested:
                    reason = (
                        "cancelled by the client"
                        if job.cancel_requested
                        else (f"interrupted {job.attempts} times by a server crash")
                    )
                    status = "cancelled" if job.cancel_requested else "failed"
                    self._db.execute(
                        "UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                        (status, time.time(), reason, job.id),
                    )
                else:
                    self._db.execute(
                        "UPDATE jobs SET status = 'queued', progress = 0 WHERE id = ?", (job.id,)
                    )
        return [self.get(_from_row(row).id) for row in rows]

    def usage(self, owner: str | None = None, since: float | None = None) -> list[Job]:
        """Succeeded jobs (with their usage), optionally of one key and since a time."""
        query = f"SELECT {_COLUMNS} FROM jobs WHERE status = 'succeeded'"
        args: list[Any] = []
        if owner is not None:
            query += " AND owner = ?"
            args.append(owner)
        if since is not None:
            query += " AND created >= ?"
            args.append(since)
        with self._locked():
            return [_from_row(row) for row in self._db.execute(query + " ORDER BY created", args).fetchall()]

    def pending_webhooks(self) -> list[Job]:
        """Finished jobs whose webhook has no outcome yet (webhook_status is written once, when delivery
        ends): deliveries a crash or a shutdown cut, and those of jobs failed by `recover()`. Oldest first."""
        with self._locked():
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE webhook_url IS NOT NULL AND webhook_status IS NULL "
                "AND status IN ('succeeded', 'failed', 'cancelled') ORDER BY finished, id"
            ).fetchall()
        return [_from_row(row) for row in rows]

    def close(self) -> None:
        self._db.close()


def _stored(column: str, value: Any) -> Any:
    """A value as its column stores it: JSON text for the JSON columns (records through their codec)."""
    if column not in _JSON_COLUMNS or value is None:
        return value
    return json_bytes(to_json(value) if column in _RECORD_COLUMNS else value).decode()


def _to_row(job: Job) -> dict[str, Any]:
    row = {name: _stored(name, getattr(job, name)) for name in _COLUMN_NAMES}
    row["status"] = job.status.value
    row["cancel_requested"] = int(job.cancel_requested)
    return row


def _from_row(row: tuple[Any, ...]) -> Job:
    values = dict(zip(_COLUMN_NAMES, row, strict=True))
    for name in _JSON_COLUMNS:
        values[name] = orjson.loads(values[name]) if values[name] is not None else None
    for name, record in _RECORD_COLUMNS.items():
        if values[name] is not None:
            values[name] = from_json(record, values[name])
    values["status"] = JobStatus(values["status"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["extra"] = values["extra"] or {}
    return Job(**values)
