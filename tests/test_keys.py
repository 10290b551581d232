"""The API key stores' contract, on both (ids [sqlite], [postgres]): names, digests, revocation; a key created
through one store object is seen by another at once (another process, in production)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kleinserve.api.auth import KeyStore, SqliteKeyStore
from kleinserve.errors import Conflict, InvalidInput, NotFound
from kleinserve.jobs.postgres import PostgresKeyStore
from kleinserve.keys import KEY_PREFIX, key_digest

Opener = Callable[[], KeyStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_keys(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    opened: list[KeyStore] = []
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""

    def open_one() -> KeyStore:
        keys: KeyStore = SqliteKeyStore(tmp_path / "db") if not url else PostgresKeyStore(url, max_size=1)
        opened.append(keys)
        return keys

    yield open_one
    for keys in opened:
        keys.close()


def test_a_key_is_named_shown_once_and_revoked_for_every_store_object(open_keys: Opener) -> None:
    keys, other = open_keys(), open_keys()
    assert not keys.has_any_keys() and not keys.has_active_keys()
    key = keys.create("alice")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    assert other.name_of(key) == "alice" and other.has_active_keys()
    assert other.name_of(key + "x") is None
    bobs = other.create("bob@example.com")
    assert [(listed.name, listed.revoked) for listed in keys.list()] == [
        ("alice", None),
        ("bob@example.com", None),
    ]
    keys.revoke("alice")
    assert other.name_of(key) is None and other.name_of(bobs) == "bob@example.com"
    with pytest.raises(NotFound):
        other.revoke("alice")  # revoked already
    other.revoke("bob@example.com")
    assert not keys.has_active_keys() and keys.has_any_keys()  # the server stays closed
    with pytest.raises(Conflict, match="exists already"):
        keys.create("alice")  # a revoked key keeps its name
    with pytest.raises(NotFound):
        keys.revoke("nobody")


@pytest.mark.parametrize("name", ["", "-dash", "a b", "anonymous", "x" * 65, "(no key)"])
def test_malformed_names_are_refused(open_keys: Opener, name: str) -> None:
    keys = open_keys()
    with pytest.raises(InvalidInput, match="is not allowed"):
        keys.create(name)
    assert keys.list() == []


def test_only_the_digest_is_stored(tmp_path: Path) -> None:
    keys = SqliteKeyStore(tmp_path / "db")
    key = keys.create("alice")
    keys.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "db")) as db:
        assert db.execute("SELECT digest FROM api_keys").fetchall() == [(key_digest(key),)]
