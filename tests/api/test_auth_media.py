"""API keys (the `kleinserve keys` commands, the server's checks, the loopback-only rule) and media links.

The CLI runs for real as a subprocess; `keys` and the binding check import nothing heavy, so each run takes a
fraction of a second. Servers are real loopback servers on a data dir the test controls.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore
from kleinserve.api.server import ServerSettings, check_binding, create_app
from kleinserve.engine import Pipeline
from kleinserve.errors import InvalidInput, KleinError
from kleinserve.media import MEDIA_SECRET_ENV, MediaStore, media_secret_from_env
from kleinserve.objects import LocalObjects
from kleinserve.types import ImageFormat
from tests.api.conftest import RunningServer, serve_in_thread

OPENAI = "/v1/images/generations"
CLOUDFLARE = "/client/v4/accounts/test/ai/run/@cf/black-forest-labs/flux-2-klein-4b"
VERCEL = "/image-model"
QUICK = {"prompt": "a red fox", "size": "256x256", "num_inference_steps": 1}
CLI_TIMEOUT_S = 60


def kleinserve(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "KLEINSERVE_DATA"}
    return subprocess.run(
        [sys.executable, "-m", "kleinserve.cli", *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=env,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """A failed command: exit code 2, one line on stderr, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kleinserve: error: "), done.stderr
    return lines[0]


# --- keys -------------------------------------------------------------------------------------------------


def test_keys_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = kleinserve("keys", "create", "--name", "alice", "--data-dir", data)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ks-") and len(key) > 40 and "\n" not in key
    assert "shown only once" in created.stderr

    # Only the digest is stored: the key appears in no file of the data dir (database, WAL, anything).
    stored = b"".join(path.read_bytes() for path in data.rglob("*") if path.is_file())
    assert key.encode() not in stored
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored

    listing = kleinserve("keys", "list", "--data-dir", data)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith("alice\tactive\tcreated ")
    assert key not in listing.stdout

    assert "exists already" in one_line_error(
        kleinserve("keys", "create", "--name", "alice", "--data-dir", data)
    )

    revoked = kleinserve("keys", "revoke", "alice", "--data-dir", data)
    assert revoked.returncode == 0, revoked.stderr
    assert kleinserve("keys", "list", "--data-dir", data).stdout.startswith("alice\trevoked\t")
    assert "no active key named 'alice'" in one_line_error(
        kleinserve("keys", "revoke", "alice", "--data-dir", data)
    )


@pytest.fixture
def keyed_server(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> Iterator[tuple[RunningServer, str]]:
    """A server whose data dir (start_server's first, data-0) holds the key "alice"; yields it and the key."""
    store = SqliteKeyStore(tmp_path / "data-0" / DATABASE_NAME)
    key = store.create("alice")
    store.close()
    running = start_server()
    assert running.settings.data_dir == tmp_path / "data-0"
    yield running, key


def test_requests_without_a_valid_key_are_refused_in_each_dialect(
    keyed_server: tuple[RunningServer, str],
) -> None:
    running, key = keyed_server
    with httpx.Client(base_url=running.base_url, timeout=60) as client:
        for headers in (
            {},
            {"Authorization": "Bearer ks-wrong"},
            {"Authorization": "Basic abc"},
            {"x-key": ""},
        ):
            openai = client.post(OPENAI, json=QUICK, headers=headers)
            assert openai.status_code == 401, openai.text[:300]
            error = openai.json()["error"]
            assert error["code"] == "unauthorized" and error["type"] == "invalid_request_error"
            assert "key" in error["message"].lower()

            cloudflare = client.post(CLOUDFLARE, files={"prompt": (None, "x")}, headers=headers)
            assert cloudflare.status_code == 401, cloudflare.text[:300]
            assert cloudflare.json()["success"] is False
            assert cloudflare.json()["errors"][0]["code"] == 10000

            vercel = client.post(VERCEL, json={"prompt": "x", "size": "256x256"}, headers=headers)
            assert vercel.status_code == 401, vercel.text[:300]
            assert "key" in vercel.json()["error"]["message"].lower()

            assert client.get("/v1/models", headers=headers).status_code == 401
        # After each refusal the server still serves a caller with the key.
        assert client.post(OPENAI, json=QUICK, headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        ("Authorization", "Bearer {key}"),
        ("Authorization", "bearer {key}"),
        ("Authorization", "Key {key}"),
        ("x-key", "{key}"),
    ],
    ids=["bearer", "bearer-lowercase", "key", "x-key"],
)
def test_key_is_accepted_in_each_header(
    keyed_server: tuple[RunningServer, str], header: tuple[str, str]
) -> None:
    running, key = keyed_server
    name, template = header
    with httpx.Client(
        base_url=running.base_url, timeout=60, headers={name: template.format(key=key)}
    ) as client:
        assert client.post(OPENAI, json=QUICK).status_code == 200
        cloudflare = client.post(
            CLOUDFLARE, files={"prompt": (None, "x"), "width": (None, "256"), "height": (None, "256")}
        )
        assert cloudflare.status_code == 200, cloudflare.text[:300]
        assert client.post(VERCEL, json={"prompt": "x", "size": "256x256"}).status_code == 200


def test_revoked_key_is_refused_by_the_running_server(keyed_server: tuple[RunningServer, str]) -> None:
    """Revoking the only key must lock its holder out, not open the server to everyone."""
    running, key = keyed_server
    data_dir = running.settings.data_dir
    with httpx.Client(base_url=running.base_url, timeout=60) as client:
        assert client.post(OPENAI, json=QUICK, headers={"x-key": key}).status_code == 200
        assert kleinserve("keys", "revoke", "alice", "--data-dir", data_dir).returncode == 0
        for headers in ({"x-key": key}, {"Authorization": f"Bearer {key}"}, {}):
            refused = client.post(OPENAI, json=QUICK, headers=headers)
            assert refused.status_code == 401, refused.text[:300]
        # A new key works at once, without a restart.
        created = kleinserve("keys", "create", "--name", "bob", "--data-dir", data_dir)
        bob = created.stdout.strip()
        assert client.post(OPENAI, json=QUICK, headers={"Authorization": f"Bearer {bob}"}).status_code == 200
        assert client.post(OPENAI, json=QUICK, headers={"x-key": key}).status_code == 401


def test_serve_on_all_interfaces_without_a_key_exits_at_once(tmp_path: Path) -> None:
    # A model that does not exist: had the command tried to load it, the error would be about the model.
    started = time.monotonic()
    done = kleinserve(
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "1",
        "--data-dir",
        tmp_path / "data",
        "--model",
        tmp_path / "none",
    )
    line = one_line_error(done)
    assert "refusing to listen on 0.0.0.0 with no API key" in line
    assert "--insecure-no-auth" in line
    assert done.stdout == ""
    assert time.monotonic() - started < 10  # no torch import, no model loading


def test_check_binding(tmp_path: Path, server_pipeline: Pipeline) -> None:
    keys = SqliteKeyStore(tmp_path / DATABASE_NAME)
    try:
        public = ServerSettings(data_dir=tmp_path, host="0.0.0.0")
        with pytest.raises(InvalidInput, match="refusing to listen on 0.0.0.0") as refused:
            check_binding(public, keys)
        assert refused.value.param == "host"
        with pytest.raises(InvalidInput):  # nor can the app be built that way
            create_app(public, server_pipeline)
        check_binding(ServerSettings(data_dir=tmp_path, host="0.0.0.0", insecure_no_auth=True), keys)
        for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
            check_binding(ServerSettings(data_dir=tmp_path, host=host), keys)
        keys.create("alice")
        check_binding(public, keys)
        keys.revoke("alice")
        with pytest.raises(InvalidInput):  # only revoked keys: nobody could use it, yet it would look open
            check_binding(public, keys)
    finally:
        keys.close()


# --- media ------------------------------------------------------------------------------------------------


def url_image(client: httpx.Client, base_url: str) -> str:
    """A generation answered with a signed media URL; returns the URL."""
    response = client.post(base_url + OPENAI, json={**QUICK, "response_format": "url"})
    assert response.status_code == 200, response.text[:300]
    item = response.json()["data"][0]
    assert "b64_json" not in item
    return item["url"]


def media_name(url: str) -> str:
    return urlsplit(url).path.removeprefix("/media/")


def assert_forbidden(response: httpx.Response, words: str) -> None:
    assert response.status_code == 403, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "forbidden" and words in error["message"]


def test_media_links(start_server: Callable[..., RunningServer]) -> None:
    running = start_server()
    with httpx.Client(timeout=60) as client:
        url = url_image(client, running.base_url)
        assert url.startswith(running.base_url + "/media/")
        served = client.get(url)
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(served.content)).size == (256, 256)

        query = parse_qs(urlsplit(url).query)
        signature, expires = query["signature"][0], int(query["expires"][0])
        base = url.split("?")[0]
        flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
        assert_forbidden(client.get(base, params={"expires": expires, "signature": flipped}), "signature")
        later = {"expires": expires + 3600, "signature": signature}  # a longer life, same signature
        assert_forbidden(client.get(base, params=later), "signature")

        store = MediaStore.in_data_dir(running.settings.data_dir)  # the server's secret, from its data dir
        name = media_name(url)
        assert_forbidden(
            client.get(running.base_url + store.signed_path(name, now=time.time() - 3600)), "expired"
        )

        unknown = client.get(running.base_url + store.signed_path("no-such-image.png"))
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "not_found"
        # Even with a valid signature (which only the server can make), nothing outside the media directory
        # is reachable.
        query = store.signed_path("../secret.key").split("?", 1)[1]
        for encoded in ("..%2Fsecret.key", "%2E%2E%2Fsecret.key", "..%5Csecret.key"):
            answer = client.get(f"{running.base_url}/media/{encoded}?{query}")
            assert answer.status_code in (403, 404), (encoded, answer.status_code)
            assert store.secret not in answer.content
        assert client.get(base).status_code == 400  # no signature at all
        assert client.get(url).status_code == 200  # and the good link still works


def test_remove_expired(tmp_path: Path) -> None:
    store = MediaStore(LocalObjects(tmp_path), secret=b"s" * 32, ttl_s=600)
    directory = tmp_path / "media"
    old = store.save(b"old image", ImageFormat.PNG)
    new = store.save(b"new image", ImageFormat.WEBP)
    past = time.time() - 601
    os.utime(directory / old, (past, past))
    assert store.remove_expired() == 1
    assert sorted(path.name for path in directory.iterdir()) == [new]
    assert store.remove_expired() == 0
    assert store.remove_expired(now=time.time() + 601) == 1
    assert list(directory.iterdir()) == []


def test_secret_is_created_once_private_and_survives_restarts(
    tmp_path: Path, server_pipeline: Pipeline
) -> None:
    settings = ServerSettings(data_dir=tmp_path / "data")
    first = serve_in_thread(settings, server_pipeline)
    try:
        secret_file = settings.data_dir / "secret.key"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_bytes()
        assert len(secret) == 32
        assert [path.name for path in settings.data_dir.glob(".secret.key*")] == []  # no draft left behind
        with httpx.Client(timeout=60) as client:
            url = url_image(client, first.base_url)
    finally:
        first.stop()

    second = serve_in_thread(settings, server_pipeline)  # a restart on the same data dir (another port)
    try:
        assert secret_file.read_bytes() == secret
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        moved = second.base_url + url.removeprefix(first.base_url)
        with httpx.Client(timeout=60) as client:
            served = client.get(moved)
        assert served.status_code == 200, served.text[:300]
        assert Image.open(io.BytesIO(served.content)).size == (256, 256)
    finally:
        second.stop()


def test_damaged_secret_is_refused_rather_than_used(tmp_path: Path) -> None:
    """An empty or short secret would make links forgeable: the server refuses to start with it."""
    (tmp_path / "secret.key").write_bytes(b"")
    with pytest.raises(KleinError, match="delete it"):
        MediaStore.in_data_dir(tmp_path)
    (tmp_path / "secret.key").unlink()
    first = MediaStore.in_data_dir(tmp_path)
    assert MediaStore.in_data_dir(tmp_path).secret == first.secret


def test_media_secret_from_the_environment() -> None:
    """API processes without a shared data dir share the link secret through KLEINSERVE_MEDIA_SECRET."""
    assert media_secret_from_env({}) is None
    assert media_secret_from_env({MEDIA_SECRET_ENV: " "}) is None
    assert media_secret_from_env({MEDIA_SECRET_ENV: "ab" * 32}) == b"\xab" * 32
    assert media_secret_from_env({MEDIA_SECRET_ENV: "AB" * 40 + "\n"}) == b"\xab" * 40
    for unusable in ("ab" * 31, "xy" * 32, "a" * 65):  # short, not hex, odd length
        with pytest.raises(InvalidInput, match="openssl rand -hex 32") as raised:
            media_secret_from_env({MEDIA_SECRET_ENV: unusable})
        assert raised.value.param == MEDIA_SECRET_ENV
