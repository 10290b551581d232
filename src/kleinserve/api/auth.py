"""API keys: created once, shown once, stored as SHA-256 digests in the data dir's SQLite file.

Accepted on the wire as `Authorization: Bearer <key>` (OpenAI, Cloudflare, Vercel), `Authorization: Key <key>`
(fal) or `x-key: <key>` (BFL). Until the first key is created the server is open, and for that reason it
then binds only to loopback (`check_open_binding` refuses another address unless --insecure-no-auth). Once a
key has been created the server stays closed, even after every key is revoked: revoking the last key must lock
callers out, not let everyone in.

This module imports nothing heavy, so `kleinserve keys ...` and the binding check run without loading torch.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kleinserve.errors import Conflict, InvalidInput, NotFound, Unauthorized
from kleinserve.files import private_database

DATABASE_NAME = "kleinserve.db"  # in the data dir
KEY_PREFIX = "ks-"
# Key names are words (KEY_NAME); the owner of the jobs made while the server is open is not one, so that no
# key created later can take it and see those jobs (tests/api/test_job_edges.py::test_open_owner_is_no_key).
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ANONYMOUS = "(no key)"
LEGACY_OPEN_OWNER = "anonymous"  # the open server's owner before "(no key)": rows may still carry it
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
)
"""


@dataclass(frozen=True)
class ApiKey:
    name: str
    created: float
    revoked: float | None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Named API keys in `<data dir>/kleinserve.db` (table api_keys)."""

    def __init__(self, database: Path) -> None:
        self._db = sqlite3.connect(private_database(database), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def create(self, name: str) -> str:
        """A new key for `name` (KEY_NAME: letters, digits, `._@-`, up to 64); the only time the key itself is
        visible. InvalidInput for a malformed name, Conflict for a taken one (revoked keys keep theirs)."""
        if not KEY_NAME.fullmatch(name) or name == LEGACY_OPEN_OWNER:
            raise InvalidInput(
                f"key name {name!r} is not allowed",
                param="name",
                allowed="1-64 letters, digits, '.', '_', '@' or '-', from a letter or digit; not 'anonymous'",
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            self._db.execute(
                "INSERT INTO api_keys (name, digest, created) VALUES (?, ?, ?)",
                (name, _digest(key), time.time()),
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
        """Whether a key was ever created (revoked ones included): if so, every request needs a key."""
        return self._db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def name_of(self, key: str) -> str | None:
        """The name of an active key, or None. Looked up by digest, so no key is ever compared in clear."""
        row = self._db.execute(
            "SELECT name FROM api_keys WHERE digest = ? AND revoked IS NULL", (_digest(key),)
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
