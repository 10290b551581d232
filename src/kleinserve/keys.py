"""API keys as every key store keeps them (api/auth.py's SqliteKeyStore, jobs/postgres.py's PostgresKeyStore):
named, shown once when made, stored only as SHA-256 digests, revoked rather than deleted (a revoked key keeps
its name taken).

    key, digest = new_key("alice")   # the key, for its owner; the digest, for the store
    key_digest(key) == digest        # a presented key is looked up by its digest, never compared in clear
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from kleinserve.errors import InvalidInput

KEY_PREFIX = "ks-"
# Key names are words (KEY_NAME); the owner of the jobs made while the server is open (api/auth.py's
# ANONYMOUS) is not one, so that no key created later can take it and see those jobs
# (tests/api/test_job_edges.py::test_open_owner_is_no_key).
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
LEGACY_OPEN_OWNER = "anonymous"  # the open server's owner before "(no key)": rows may still carry it


@dataclass(frozen=True)
class ApiKey:
    """A key as listed: its name, and when it was created and revoked (Unix s; None while active)."""

    name: str
    created: float
    revoked: float | None


def key_digest(key: str) -> str:
    """The hex SHA-256 of a key: what the stores keep and look keys up by."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str) -> tuple[str, str]:
    """A new key for `name` and its digest. InvalidInput unless `name` is KEY_NAME (letters, digits, `._@-`,
    up to 64) and not LEGACY_OPEN_OWNER; whether the name is taken is the store's to say."""
    if not KEY_NAME.fullmatch(name) or name == LEGACY_OPEN_OWNER:
        raise InvalidInput(
            f"key name {name!r} is not allowed",
            param="name",
            allowed="1-64 letters, digits, '.', '_', '@' or '-', from a letter or digit; not 'anonymous'",
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key_digest(key)
