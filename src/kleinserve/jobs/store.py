"""The job store: every accepted request, sync or async, is a row that survives a restart, and the queue is
those rows (there is no other).

`JobStore` is the interface the API and the workers use. `SqliteJobStore` keeps it in
`<data dir>/kleinserve.db` (WAL mode), for one box; `PostgresJobStore` (jobs/postgres.py) in a database that
any number of API processes and workers on any number of machines share. Both run the statements of
jobs/sql.py and pass one contract suite (tests/jobs/test_store.py); the schemas are numbered migrations
(jobs/migrations/). Reference images are not in the row: the submitter stores them, as prepared, in the
reference store, so a job re-runs identically.

The row and its lifecycle: jobs/job.py, whose names this module re-exports.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from kleinserve.errors import StoreUnavailable
from kleinserve.files import private_database
from kleinserve.jobs.job import (
    LEASE_S,
    MAX_ATTEMPTS,
    Job,
    JobStatus,
    LeaseLost,
    Load,
    StepCheck,
    SubmitLimits,
    new_job_id,
)
from kleinserve.jobs.migrations import scripts
from kleinserve.jobs.sql import Execute, SqlJobStore

__all__ = [
    "BUSY_TIMEOUT_S",
    "LEASE_S",
    "MAX_ATTEMPTS",
    "Job",
    "JobStatus",
    "JobStore",
    "LeaseLost",
    "Load",
    "SqliteJobStore",
    "StepCheck",
    "SubmitLimits",
    "new_job_id",
]

# How long a statement waits for another connection's write lock before StoreUnavailable. Below the clients'
# patience: a locked store answers 503 in seconds rather than holding requests (and threads) for long.
BUSY_TIMEOUT_S = 5.0


class JobStore(Protocol):
    """Every method may block (a lock, the network) and raises StoreUnavailable when the store cannot be used
    (callers on the event loop go through a thread). Times are Unix seconds."""

    def add(self, job: Job) -> Job:
        """Store a new job as it is."""
        ...

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job; NotFound when it does not exist or belongs to another key than `owner`."""
        ...

    def owned(self, owner: str, status: JobStatus | None = None, limit: int = 50) -> list[Job]:
        """`owner`'s jobs, newest first, optionally of one status."""
        ...

    def queued(self, limit: int = 1000) -> list[Job]:
        """Queued jobs, oldest first."""
        ...

    def mark_running(self, job_ids: list[str]) -> list[str]:
        """Run queued jobs without a claim (the one-box worker before claims); returns the ids that were still
        queued, now running with one more attempt."""
        ...

    def set_progress(self, job_id: str, progress: float) -> None: ...

    def finish(self, job_id: str, status: JobStatus, *, fence: int | None = None, **fields: Any) -> Job:
        """Move a job to a terminal status, setting `error`, `result` (JobResult), `usage` (JobUsage),
        `progress` and `finished` (default: now) as given; returns the row. With `fence`, only a job still
        running under that fence is written, else LeaseLost (nothing written). NotFound for an unknown job."""
        ...

    def request_cancel(self, job_id: str, owner: str) -> Job:
        """Queued: cancelled at once. Running: flagged (its worker stops it at the next step, unless it ends
        first). Finished: Conflict. Another key's or unknown: NotFound. Returns the row as it is now."""
        ...

    def set_webhook_status(self, job_id: str, status: str) -> None:
        """The webhook's outcome, written once, when its delivery ends."""
        ...

    def load(self, owner: str) -> Load: ...

    def check_writable(self) -> None:
        """Return once the store takes writes; StoreUnavailable while it does not."""
        ...

    def recover(self) -> list[Job]:
        """On one box at start-up, where every running job was cut by a crash: each is cancelled if its cancel
        was asked, failed after MAX_ATTEMPTS ("interrupted N times by a server crash"), else queued again.
        Returns them as changed. Processes sharing a store never call it: requeue_expired does it there."""
        ...

    def usage(self, owner: str | None = None, since: float | None = None) -> list[Job]:
        """Succeeded jobs (with their usage), oldest first, optionally of one key and created since a time."""
        ...

    def close(self) -> None: ...

    def pending_webhooks(self) -> list[Job]:
        """Finished jobs whose webhook has no outcome yet, oldest first (deliveries cut by a crash)."""
        ...

    def submit(self, job: Job, limits: SubmitLimits) -> Load:
        """Add `job` if `limits` allow, as one transaction; returns the Load before it was added. Overloaded
        ("N jobs are waiting (limit M)", "N jobs of this key are in flight (limit M)", retry after 5 s)
        otherwise. The per-key limit holds across processes; under concurrent submits of different keys the
        waiting limit may be passed by the number of processes submitting at that instant."""
        ...

    def claim(
        self, worker: str, models: Sequence[str] | None, max_images: int, lease_s: float = LEASE_S
    ) -> list[Job]:
        """Claim a batch for `worker`: the oldest queued job whose model is in `models` (None: any; a job for
        model "" goes to any worker) decides the model and batch key; queued jobs of both join, oldest first,
        while their images fit in `max_images` (the oldest always joins; one that does not fit is skipped).
        They become running, with one more attempt, progress 0, and one new fence (larger than any before) and
        a lease of `lease_s` shared by the batch. Returns them oldest first; [] when nothing is queued. Two
        concurrent claims never take the same job."""
        ...

    def extend(
        self, job_ids: Sequence[str], fence: int, lease_s: float = LEASE_S, progress: float | None = None
    ) -> StepCheck:
        """At a step: extend the lease of those of `job_ids` still running under `fence` to now + `lease_s`
        (and set their progress, 0-1, if given); returns which of them have a cancel asked, and which are lost
        (no longer running under `fence`)."""
        ...

    def requeue_expired(self, now: float | None = None) -> list[Job]:
        """Running jobs whose lease ended before `now` (default: the clock): cancelled if their cancel was
        asked, failed after MAX_ATTEMPTS ("its worker stopped answering N times"), else queued again (no
        worker, no lease, progress 0). Returns them as changed; two concurrent calls never change one job."""
        ...

    def queue_depth(self, models: Sequence[str] | None = None) -> int:
        """Queued jobs that workers of `models` (None: any) may claim."""
        ...

    def advertise(self, worker: str, models: Sequence[str], ttl_s: float) -> None:
        """`worker` serves `models` for the next `ttl_s` seconds (called again before they pass)."""
        ...

    def served_models(self) -> set[str]:
        """The models of the workers whose advertisement has not expired."""
        ...

    def retire(self, worker: str) -> None:
        """Withdraw `worker`'s advertisement (it is draining)."""
        ...

    def claim_webhooks(self, holder: str, limit: int, lease_s: float) -> list[Job]:
        """The webhook outbox: up to `limit` finished jobs with a webhook_url and no webhook_status, oldest
        first, that no other holder claimed in the last `lease_s` seconds, now claimed by `holder` for
        `lease_s`: one process delivers each (set_webhook_status ends it; an unfinished one is claimed again
        once the claim ends)."""
        ...

    def shared_secret(self, name: str, size: int = 32) -> bytes:
        """A random secret of `size` bytes made the first time `name` is asked for, then the same for every
        process of the store (later sizes are ignored)."""
        ...


class SqliteJobStore(SqlJobStore):
    """JobStore on one SQLite file; safe to call from any thread. Every call may block for up to
    `busy_timeout_s` (another process holds the write lock) and then raises StoreUnavailable, as it does for a
    full disk or an I/O error. A database made by an older version is migrated when opened, its jobs kept.
    """

    def __init__(self, database: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self._db = sqlite3.connect(
            private_database(database), timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._migrate()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This connection for one thread at a time; SQLite's operational failures (locked, busy, disk full,
        I/O) as StoreUnavailable, which every layer above handles (503, a retried write, /readyz false)."""
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"the job store cannot be used right now ({exc})") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[Execute]:
        with self._locked():  # each statement is its own transaction: reads take no write lock
            yield self._db.execute

    @contextlib.contextmanager
    def _write(self) -> Iterator[Execute]:
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")  # the file's write lock, for the whole transaction
            try:
                yield self._db.execute
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back by itself after some errors (a full disk)
                    self._db.execute("ROLLBACK")
                raise

    def _next_fence(self, run: Execute) -> int:
        return int(run("UPDATE fence_counter SET last = last + 1 RETURNING last").fetchall()[0][0])

    def _serialize_submits(self, run: Execute, owner: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already serializes every writer of the file."""

    def _migrate(self) -> None:
        """Apply the migrations this file lacks, in one transaction (another process opening it waits)."""
        with self._write() as run:
            run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied REAL)")
            (current,) = run("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
            for version, script in scripts("sqlite"):
                if version > current:
                    for statement in _statements(script):
                        run(statement)
                    run("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version, time.time()))

    def check_writable(self) -> None:
        """Take and release the write lock (StoreUnavailable if another connection keeps it)."""
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()


def _statements(script: str) -> Iterator[str]:
    """An SQL script's statements, one by one (`executescript` would commit the migration's transaction)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
