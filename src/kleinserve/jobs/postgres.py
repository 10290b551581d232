"""The job store and the API keys in PostgreSQL, shared by any number of API processes and workers
(`kleinserve api`, `kleinserve worker`): psycopg 3 with a connection pool, the statements of jobs/sql.py, and
what only PostgreSQL does here.

    store = PostgresJobStore("postgresql://kleinserve@db.internal/kleinserve")
    jobs = store.claim("gpu-3", ["klein-4b"], max_images=4)   # a batch no other worker holds

- Claims, expired leases and the webhook outbox lock the rows they pick with `FOR UPDATE SKIP LOCKED`: two
  workers never claim the same job and never wait for each other's claim (plain FOR UPDATE would queue them).
- Submits of one key take `pg_advisory_xact_lock(SUBMIT_LOCKS, hashtext(owner))` before counting, so the
  per-key in-flight limit holds across API processes.
- Fences come from the sequence `job_fence`: strictly increasing across the whole store.
- The schema is migrations/postgres/*.sql, applied at open in one transaction under an advisory lock
  (`MIGRATION_LOCKS`), so that processes starting together migrate once.
- The server gone, a refused connection or the pool's wait running out (POOL_TIMEOUT_S) raise
  StoreUnavailable, as SQLite's lock does: the API answers 503. The pool checks a connection before lending
  it and replaces broken ones, so service resumes by itself once the server is back.

Advisory locks are two-key (namespace, object); SUBMIT_LOCKS and MIGRATION_LOCKS are the namespaces used here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from kleinserve.errors import Conflict, NotFound, StoreUnavailable
from kleinserve.jobs.migrations import scripts
from kleinserve.jobs.sql import Cursor, Execute, SqlJobStore
from kleinserve.keys import ApiKey, key_digest, new_key

MIGRATION_LOCKS = 7_318_001  # advisory lock namespaces (see the module docstring)
SUBMIT_LOCKS = 7_318_002
# How long a call waits for a pooled connection (all busy, or the server unreachable) before StoreUnavailable:
# as SQLite's BUSY_TIMEOUT_S, below the clients' patience.
POOL_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5  # one connection attempt to an unresponsive host (libpq takes whole seconds)


def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 8, timeout_s: float = POOL_TIMEOUT_S
) -> ConnectionPool:
    """A pool of connections to `url` (a libpq URL or DSN) whose schema is migrated; a call waits up to
    `timeout_s` for a connection. StoreUnavailable when the database cannot be reached within that."""
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=True,
        check=ConnectionPool.check_connection,
        timeout=timeout_s,
        # A failed connection is retried (backing off) for this long, then dropped, and the next call starts a
        # new one at once: so service resumes within seconds of the server's return, however long it was gone.
        reconnect_timeout=timeout_s,
        kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "kleinserve"},
    )
    try:
        with transaction(pool) as cursor:
            _migrate(cursor)
    except BaseException:
        pool.close()
        raise
    return pool


@contextlib.contextmanager
def transaction(pool: ConnectionPool) -> Iterator[psycopg.Cursor[Any]]:
    """A cursor in one transaction on a pooled connection: committed at the end, rolled back on an exception.
    PostgreSQL's operational failures (server gone, connection refused, no connection within POOL_TIMEOUT_S,
    a deadlock) raise StoreUnavailable; a broken connection goes back to the pool, which replaces it."""
    try:
        with pool.connection() as connection, connection.cursor() as cursor:
            yield cursor
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().partition("\n")[0] or type(exc).__name__  # libpq adds hint lines
        raise StoreUnavailable(f"the job store cannot be used right now ({reason})") from exc


def _migrate(cursor: psycopg.Cursor[Any]) -> None:
    """Apply the migrations the database lacks; a process that starts meanwhile waits on the lock, then finds
    them applied."""
    cursor.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCKS}, 0)")
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, applied double precision)"
    )
    row = cursor.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    current = row[0] if row else 0
    for version, script in scripts("postgres"):
        if version > current:
            cursor.execute(script)  # several statements: without parameters, psycopg sends a simple query
            cursor.execute(
                "INSERT INTO schema_version (version, applied) VALUES (%s, %s)", (version, time.time())
            )


class PostgresJobStore(SqlJobStore):
    """JobStore in PostgreSQL (see the module docstring); safe to call from any thread, each call on a pooled
    connection (`max_size` at most at once, the rest wait up to `timeout_s`, then StoreUnavailable)."""

    _lock_rows = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 8, timeout_s: float = POOL_TIMEOUT_S
    ) -> None:
        self._pool = open_pool(url, min_size=min_size, max_size=max_size, timeout_s=timeout_s)

    @contextlib.contextmanager
    def _read(self) -> Iterator[Execute]:
        with transaction(self._pool) as cursor:

            def run(query: str, params: Sequence[Any] = (), /) -> Cursor:
                return cursor.execute(query.replace("?", "%s"), params)

            yield run

    def _write(self) -> contextlib.AbstractContextManager[Execute]:
        return self._read()  # every transaction may write: PostgreSQL has no lock to take first

    def _next_fence(self, run: Execute) -> int:
        return int(run("SELECT nextval('job_fence')").fetchone()[0])

    def _serialize_submits(self, run: Execute, owner: str) -> None:
        run(f"SELECT pg_advisory_xact_lock({SUBMIT_LOCKS}, hashtext(?))", (owner,))

    def check_writable(self) -> None:
        """StoreUnavailable while the server cannot be reached, or is a read-only standby."""
        with self._read() as run:
            if run("SELECT pg_is_in_recovery()").fetchone()[0]:
                raise StoreUnavailable("the job store is a read-only standby")

    def close(self) -> None:
        self._pool.close()


class PostgresKeyStore:
    """KeyStore (api/auth.py) in the table api_keys, the same as SqliteKeyStore's: every API process sees a
    key as soon as it is created or revoked. A pool of its own, small: one key lookup per request."""

    def __init__(self, url: str, *, max_size: int = 4, timeout_s: float = POOL_TIMEOUT_S) -> None:
        self._pool = open_pool(url, min_size=1, max_size=max_size, timeout_s=timeout_s)

    def create(self, name: str) -> str:
        key, digest = new_key(name)
        try:
            with transaction(self._pool) as cursor:
                cursor.execute(
                    "INSERT INTO api_keys (name, digest, created) VALUES (%s, %s, %s)",
                    (name, digest, time.time()),
                )
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"a key named {name!r} exists already") from None
        return key

    def revoke(self, name: str) -> None:
        with transaction(self._pool) as cursor:
            cursor.execute(
                "UPDATE api_keys SET revoked = %s WHERE name = %s AND revoked IS NULL", (time.time(), name)
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no active key named {name!r}")

    def list(self) -> list[ApiKey]:
        with transaction(self._pool) as cursor:
            rows = cursor.execute("SELECT name, created, revoked FROM api_keys ORDER BY created").fetchall()
        return [ApiKey(*row) for row in rows]

    def has_active_keys(self) -> bool:
        with transaction(self._pool) as cursor:
            return (
                cursor.execute("SELECT 1 FROM api_keys WHERE revoked IS NULL LIMIT 1").fetchone() is not None
            )

    def has_any_keys(self) -> bool:
        with transaction(self._pool) as cursor:
            return cursor.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def name_of(self, key: str) -> str | None:
        with transaction(self._pool) as cursor:
            row = cursor.execute(
                "SELECT name FROM api_keys WHERE digest = %s AND revoked IS NULL", (key_digest(key),)
            ).fetchone()
        return str(row[0]) if row else None

    def close(self) -> None:
        self._pool.close()
