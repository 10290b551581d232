"""The job store's statements, written once for both databases (SQLite: jobs/store.py, PostgreSQL:
jobs/postgres.py); the contract each method keeps is on `JobStore` (jobs/store.py).

The SQL here reads alike in both (RETURNING, ON CONFLICT, COUNT(*) FILTER, TRUE) and takes `?` placeholders,
which PostgresJobStore turns into psycopg's `%s`: so no statement contains a literal `?` or `%`. A subclass
supplies the connection (`_read`, `_write`: one transaction each), the fence counter, and the two places where
the databases lock differently: `_lock_rows` (PostgreSQL's `FOR UPDATE SKIP LOCKED` after a SELECT of rows the
transaction then changes, so that concurrent claims neither take the same job nor wait on each other; SQLite
has one writer at a time and needs none) and `_serialize_submits`.

Times are the calling process's clock (`time.time()`), as every Job value is: the machines sharing one store
keep their clocks in step (NTP); a skew of a second against LEASE_S only moves when a dead worker's jobs
rerun.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from kleinserve.errors import Conflict, NotFound, Overloaded
from kleinserve.jobs.job import (
    COLUMNS,
    LEASE_S,
    MAX_ATTEMPTS,
    Job,
    JobStatus,
    LeaseLost,
    Load,
    StepCheck,
    SubmitLimits,
    from_row,
    stored,
)

_SELECT = ", ".join(COLUMNS)
_TERMINAL = "('succeeded', 'failed', 'cancelled')"
_CRASHED = "interrupted {attempts} times by a server crash"
_ABANDONED = "its worker stopped answering {attempts} times"


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Execute(Protocol):
    """Runs one statement (`?` placeholders) in the current transaction."""

    def __call__(self, query: str, params: Sequence[Any] = (), /) -> Cursor: ...


class SqlJobStore(ABC):
    """JobStore's methods on a SQL database; subclasses connect (see the module docstring)."""

    _lock_rows = ""

    @abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[Execute]:
        """A transaction that only reads; the store's failures (locked, unreachable) as StoreUnavailable."""

    @abstractmethod
    def _write(self) -> contextlib.AbstractContextManager[Execute]:
        """A transaction that writes, committed at the end, rolled back on an exception."""

    @abstractmethod
    def _next_fence(self, run: Execute) -> int:
        """A fencing token larger than every one handed out before, by any process of the store."""

    @abstractmethod
    def _serialize_submits(self, run: Execute, owner: str) -> None:
        """Make `owner`'s submits wait for each other until the end of the transaction."""

    def add(self, job: Job) -> Job:
        with self._write() as run:
            _insert(run, job)
        return job

    def get(self, job_id: str, owner: str | None = None) -> Job:
        with self._read() as run:
            return _get(run, job_id, owner)

    def owned(self, owner: str, status: JobStatus | None = None, limit: int = 50) -> list[Job]:
        query = f"SELECT {_SELECT} FROM jobs WHERE owner = ?"
        args: list[Any] = [owner]
        if status is not None:
            query += " AND status = ?"
            args.append(status.value)
        with self._read() as run:
            return _jobs(run(query + " ORDER BY created DESC LIMIT ?", (*args, limit)))

    def queued(self, limit: int = 1000) -> list[Job]:
        with self._read() as run:
            query = f"SELECT {_SELECT} FROM jobs WHERE status = 'queued' ORDER BY created, id LIMIT ?"
            return _jobs(run(query, (limit,)))

    def mark_running(self, job_ids: list[str]) -> list[str]:
        now = time.time()
        with self._write() as run:
            return [
                job_id
                for job_id in job_ids
                if run(
                    "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, progress = 0 "
                    "WHERE id = ? AND status = 'queued'",
                    (now, job_id),
                ).rowcount
            ]

    def set_progress(self, job_id: str, progress: float) -> None:
        with self._write() as run:
            run("UPDATE jobs SET progress = ? WHERE id = ?", (progress, job_id))

    def finish(self, job_id: str, status: JobStatus, *, fence: int | None = None, **fields: Any) -> Job:
        sets = {"status": status.value, "finished": time.time(), **fields}
        if status is JobStatus.SUCCEEDED:
            sets["progress"] = 1.0
        fenced = ("", ()) if fence is None else (" AND status = 'running' AND fence = ?", (fence,))
        with self._write() as run:
            if (job := _update(run, job_id, sets, *fenced)) is not None:
                return job
            if fence is not None and run("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchall():
                raise LeaseLost(f"job {job_id} no longer runs under fence {fence}")
        raise NotFound(f"no job {job_id!r}")

    def request_cancel(self, job_id: str, owner: str) -> Job:
        with self._write() as run:
            job = _get(run, job_id, owner)
            if job.status.terminal:
                raise Conflict(
                    f"job {job_id} has already ended ({job.status.value}): there is nothing to cancel"
                )
            cancelled = {"status": "cancelled", "finished": time.time(), "error": "cancelled by the client"}
            _update(run, job_id, cancelled, " AND status = 'queued'")
            _update(run, job_id, {"cancel_requested": True}, " AND status = 'running'")
            return _get(run, job_id)

    def set_webhook_status(self, job_id: str, status: str) -> None:
        with self._write() as run:
            run("UPDATE jobs SET webhook_status = ? WHERE id = ?", (status, job_id))

    def load(self, owner: str) -> Load:
        with self._read() as run:
            return _load(run, owner)

    def recover(self) -> list[Job]:
        with self._write() as run:
            running = _jobs(run(f"SELECT {_SELECT} FROM jobs WHERE status = 'running' ORDER BY created, id"))
            return _lapse(run, running, _CRASHED, time.time())

    def usage(self, owner: str | None = None, since: float | None = None) -> list[Job]:
        query = f"SELECT {_SELECT} FROM jobs WHERE status = 'succeeded'"
        args: list[Any] = []
        if owner is not None:
            query += " AND owner = ?"
            args.append(owner)
        if since is not None:
            query += " AND created >= ?"
            args.append(since)
        with self._read() as run:
            return _jobs(run(query + " ORDER BY created", args))

    def pending_webhooks(self) -> list[Job]:
        with self._read() as run:
            return _jobs(
                run(
                    f"SELECT {_SELECT} FROM jobs WHERE webhook_url IS NOT NULL AND webhook_status IS NULL "
                    f"AND status IN {_TERMINAL} ORDER BY finished, id"
                )
            )

    def submit(self, job: Job, limits: SubmitLimits) -> Load:
        with self._write() as run:
            self._serialize_submits(run, job.owner)
            load = _load(run, job.owner)
            if load.queued >= limits.max_waiting:
                raise Overloaded(
                    f"{load.queued} jobs are waiting (limit {limits.max_waiting})", retry_after=5
                )
            if load.in_flight >= limits.max_in_flight_per_key:
                raise Overloaded(
                    f"{load.in_flight} jobs of this key are in flight (limit {limits.max_in_flight_per_key})",
                    retry_after=5,
                )
            _insert(run, job)
        return load

    def claim(
        self, worker: str, models: Sequence[str] | None, max_images: int, lease_s: float = LEASE_S
    ) -> list[Job]:
        among, args = _models(models)
        with self._write() as run:
            head = run(
                f"SELECT model, batch_key FROM jobs WHERE status = 'queued'{among} "
                f"ORDER BY created, id LIMIT 1{self._lock_rows}",
                args,
            ).fetchone()
            if head is None:
                return []
            candidates = run(
                "SELECT id, images FROM jobs WHERE status = 'queued' AND model = ? AND batch_key = ? "
                f"ORDER BY created, id{self._lock_rows}",
                tuple(head),
            ).fetchall()
            chosen = _fill(candidates, max_images)  # never empty: this transaction holds the head
            now = time.time()
            claimed = _jobs(
                run(
                    "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, progress = 0, "
                    f"worker = ?, fence = ?, lease_until = ? WHERE id IN ({_marks(chosen)}) "
                    f"AND status = 'queued' RETURNING {_SELECT}",
                    (now, worker, self._next_fence(run), now + lease_s, *chosen),
                )
            )
        return sorted(claimed, key=lambda job: (job.created, job.id))

    def extend(
        self, job_ids: Sequence[str], fence: int, lease_s: float = LEASE_S, progress: float | None = None
    ) -> StepCheck:
        if not job_ids:
            return StepCheck(frozenset(), frozenset())
        with self._write() as run:
            held = run(
                "UPDATE jobs SET lease_until = ?, progress = COALESCE(?, progress) "
                f"WHERE id IN ({_marks(job_ids)}) AND status = 'running' AND fence = ? "
                "RETURNING id, cancel_requested",
                (time.time() + lease_s, progress, *job_ids, fence),
            ).fetchall()
        cancel = frozenset(job_id for job_id, requested in held if requested)
        return StepCheck(cancel, frozenset(job_ids) - {job_id for job_id, _ in held})

    def requeue_expired(self, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        with self._write() as run:
            expired = _jobs(
                run(
                    f"SELECT {_SELECT} FROM jobs WHERE status = 'running' AND lease_until < ? "
                    f"ORDER BY lease_until, id{self._lock_rows}",
                    (now,),
                )
            )
            return _lapse(run, expired, _ABANDONED, now)

    def queue_depth(self, models: Sequence[str] | None = None) -> int:
        among, args = _models(models)
        with self._read() as run:
            return int(run(f"SELECT COUNT(*) FROM jobs WHERE status = 'queued'{among}", args).fetchone()[0])

    def advertise(self, worker: str, models: Sequence[str], ttl_s: float) -> None:
        now = time.time()
        with self._write() as run:
            run(
                "INSERT INTO workers (id, models, seen, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET models = excluded.models, seen = excluded.seen, "
                "expires = excluded.expires",
                (worker, orjson.dumps(list(models)).decode(), now, now + ttl_s),
            )

    def served_models(self) -> set[str]:
        with self._read() as run:
            rows = run("SELECT models FROM workers WHERE expires > ?", (time.time(),)).fetchall()
        return {model for (models,) in rows for model in orjson.loads(models)}

    def retire(self, worker: str) -> None:
        with self._write() as run:
            run("DELETE FROM workers WHERE id = ?", (worker,))

    def claim_webhooks(self, holder: str, limit: int, lease_s: float) -> list[Job]:
        now = time.time()
        with self._write() as run:
            due = run(
                "SELECT id FROM jobs WHERE webhook_url IS NOT NULL AND webhook_status IS NULL "
                f"AND status IN {_TERMINAL} AND (webhook_claimed_until IS NULL OR webhook_claimed_until < ?) "
                f"ORDER BY finished, id LIMIT ?{self._lock_rows}",
                (now, limit),
            ).fetchall()
            if not due:
                return []
            claimed = _jobs(
                run(
                    "UPDATE jobs SET webhook_claimed_until = ?, webhook_holder = ? "
                    f"WHERE id IN ({_marks(due)}) RETURNING {_SELECT}",
                    (now + lease_s, holder, *(job_id for (job_id,) in due)),
                )
            )
        return sorted(claimed, key=lambda job: (job.finished or 0.0, job.id))

    def shared_secret(self, name: str, size: int = 32) -> bytes:
        with self._write() as run:
            run(
                "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, secrets.token_bytes(size)),
            )
            return bytes(run("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0])


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _models(models: Sequence[str] | None) -> tuple[str, list[str]]:
    """The condition for jobs that workers of `models` (None: any) may run: theirs, and those for any."""
    if models is None:
        return "", []
    return f" AND model IN ({_marks([''] + list(models))})", ["", *models]


def _fill(candidates: Sequence[tuple[str, int]], max_images: int) -> list[str]:
    """A batch from `candidates` (id, images), oldest first: the first always (a job of more images than the
    limit runs alone rather than never), then each one that still fits in `max_images`; one that does not is
    skipped, so that a younger, smaller one may still join."""
    chosen: list[str] = []
    images = 0
    for job_id, count in candidates:
        if not chosen or images + count <= max_images:
            chosen.append(job_id)
            images += count
    return chosen


def _lapse(run: Execute, jobs: list[Job], reason: str, now: float) -> list[Job]:
    """Running `jobs` whose run was lost (a crash, an expired lease), as changed: cancelled if their cancel
    was asked, failed with `reason` (formatted with `attempts`) after MAX_ATTEMPTS runs, else queued again."""
    changed = []
    for job in jobs:
        if job.cancel_requested:
            sets: dict[str, Any] = {
                "status": "cancelled",
                "finished": now,
                "error": "cancelled by the client",
            }
        elif job.attempts >= MAX_ATTEMPTS:
            sets = {"status": "failed", "finished": now, "error": reason.format(attempts=job.attempts)}
        else:
            sets = {"status": "queued", "progress": 0.0, "worker": None, "lease_until": None}
        if (updated := _update(run, job.id, sets)) is not None:
            changed.append(updated)
    return changed


def _get(run: Execute, job_id: str, owner: str | None = None) -> Job:
    """The job; NotFound when it does not exist or belongs to another key."""
    row = run(f"SELECT {_SELECT} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None or (owner is not None and row[1] != owner):
        raise NotFound(f"no job {job_id!r}")
    return from_row(row)


def _insert(run: Execute, job: Job) -> None:
    row = {name: stored(name, getattr(job, name)) for name in COLUMNS}
    row["status"] = job.status.value
    row["images"] = job.params.num_images
    values = tuple(row.values())
    run(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({_marks(values)})", values)


def _update(
    run: Execute, job_id: str, sets: dict[str, Any], condition: str = "", args: Sequence[Any] = ()
) -> Job | None:
    """Set `sets` (column: value) on the job if it meets `condition`; the row as changed, or None."""
    rows = run(  # fetched to the end: SQLite's statement (and its write) then completes
        f"UPDATE jobs SET {', '.join(f'{column} = ?' for column in sets)} WHERE id = ?{condition} "
        f"RETURNING {_SELECT}",
        (*(stored(column, value) for column, value in sets.items()), job_id, *args),
    ).fetchall()
    return from_row(rows[0]) if rows else None


def _load(run: Execute, owner: str) -> Load:
    queued, in_flight = run(
        "SELECT COUNT(*) FILTER (WHERE status = 'queued'), COUNT(*) FILTER (WHERE owner = ?) "
        "FROM jobs WHERE status IN ('queued', 'running')",
        (owner,),
    ).fetchone()
    return Load(int(queued), int(in_flight))


def _jobs(cursor: Cursor) -> list[Job]:
    return [from_row(row) for row in cursor.fetchall()]
