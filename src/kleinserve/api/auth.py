"""API keys: created once, shown once, stored as SHA-256 digests (kleinserve/keys.py) in a `KeyStore`: the
data dir's SQLite file (`SqliteKeyStore`), or the PostgreSQL database processes share (jobs/postgres.py).

Accepted on the wire as `Authorization: Bearer <key>` (OpenAI, Cloudflare, Vercel), `Authorization: Key <key>`
(fal) or `x-key: <key>` (BFL). Until the first key is created the server is open, and for that reason it
then binds only to loopback (`check_open_binding` refuses another address unless --insecure-no-auth). Once a
key has been created the server stays closed, even after every key is revoked: revoking the last key must lock
callers out, not let everyone in.

This module imports nothing heavy, so `kleinserve keys ...` and the binding check run without loading torch.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from kleinserve.errors import Conflict, InvalidInput, NotFound, Unauthorized
from kleinserve.files import private_database
from kleinserve.keys import ApiKey, key_digest, new_key

DATABASE_NAME = "kleinserve.db"  # in the data dir
ANONYMOUS = "(no key)"  # the owner while the server is open: no key name can be it (keys.KEY_NAME)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
)
"""


class KeyStore(Protocol):
    """Named API keys (kleinserve/keys.py). Every method may block on the database."""

    def create(self, name: str) -> str:
        """A new key for `name`, the only time the key itself is visible. InvalidInput for a malformed name,
        Conflict for a taken one (revoked keys keep theirs)."""
        ...

    def revoke(self, name: str) -> None:
        """NotFound unless `name` has an active key."""
        ...

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""
        ...

    def has_active_keys(self) -> bool: ...

    def has_any_keys(self) -> bool:
        """Whether a key was ever created (revoked ones included): if so, every request needs a key."""
        ...

    def name_of(self, key: str) -> str | None:
        """The name of an active key, or None; looked up by digest."""
        ...

    def close(self) -> None: ...


class SqliteKeyStore:
    """KeyStore in `<data dir>/kleinserve.db` (table api_keys)."""

    def __init__(self, database: Path) -> None:
        self._db = sqlite3.connect(private_database(database), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def create(self, name: str) -> str:
        key, digest = new_key(name)
        try:
            self._db.execute(
                "INSERT INTO api_keys (name, digest, created) VALUES (?, ?, ?)", (name, digest, time.time())
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"a key named {name!r} exists already") from None
        return key

    def revoke(self, name: str) -> None:
        cursor = self._db.execute(
            "UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name)
        )
        if cursor.rowcount == 0:
            raise NotFound(f"no active key named {name!r}")

    def list(self) -> list[ApiKey]:
        rows = self._db.execute("SELECT name, created, revoked FROM api_keys ORDER BY created").fetchall()
        return [ApiKey(*row) for row in rows]

    def has_active_keys(self) -> bool:
        return self._db.execute("SELECT 1 FROM api_keys WHERE revoked IS NULL LIMIT 1").fetchone() is not None

    def has_any_keys(self) -> bool:
        return self._db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def name_of(self, key: str) -> str | None:
        row = self._db.execute(
            "SELECT name FROM api_keys WHERE digest = ? AND revoked IS NULL", (key_digest(key),)
        ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self._db.close()


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key a client sent, in any of the accepted headers."""
    if key := headers.get("x-key"):
        return key.strip()
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("bearer", "key") and value.strip():
        return value.strip()
    return None


def authenticate(store: KeyStore, headers: Mapping[str, str]) -> str:
    """The calling key's name (ANONYMOUS until the first key is created); Unauthorized otherwise."""
    if not store.has_any_keys():
        return ANONYMOUS
    key = key_from_headers(headers)
    if key is None:
        raise Unauthorized("missing API key: send Authorization: Bearer <key> or x-key: <key>")
    name = store.name_of(key)
    if name is None:
        raise Unauthorized("invalid API key")
    return name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_open_binding(host: str, keys: KeyStore, insecure_no_auth: bool = False) -> None:
    """Without any usable API key the server is open, so it may only listen on loopback."""
    if is_loopback(host) or keys.has_active_keys() or insecure_no_auth:
        return
    raise InvalidInput(
        f"refusing to listen on {host} with no API key: anyone could use the server",
        param="host",
        allowed="create a key first (kleinserve keys create --name NAME), or pass --insecure-no-auth",
    )
