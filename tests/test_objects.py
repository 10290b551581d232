"""The object-store seam (kleinserve/objects.py) and the media stores on it.

One contract suite runs against both stores: LocalObjects in a temp dir and S3Objects on moto's S3 server
(tests/s3.py). Then media links end to end on S3, through a real HTTP server and the real `/media` route
(`serve_media`): streamed by the API process, or redirected to moto's presigned URL.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from kleinserve.api.app import serve_media
from kleinserve.errors import InvalidInput, KleinError, NotFound, StoreUnavailable
from kleinserve.media import MediaStore, ReferenceStore
from kleinserve.objects import LocalObjects, ObjectStore, S3Objects, open_objects
from kleinserve.types import ImageFormat
from tests.conftest import pixels, random_image
from tests.s3 import S3Media, client

BAD_KEYS = ("", "/media/x.png", "../x", "media/../x", "media//x", "media/x/", "media/.x", "a b", "médià/x")
SECRET = b"k" * 32


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjects(tmp_path / "data")
    media: S3Media = request.getfixturevalue("s3_media_url")
    return S3Objects(media.bucket, media.prefix, client(media.endpoint))


@pytest.fixture
def s3_objects(s3_media_url: S3Media) -> S3Objects:
    return S3Objects(s3_media_url.bucket, s3_media_url.prefix, client(s3_media_url.endpoint))


# --- the contract, on both stores ---------------------------------------------------------------------


def test_put_get_replace_delete(objects: ObjectStore) -> None:
    objects.put("media/a.png", b"first")
    assert objects.get("media/a.png") == b"first"
    objects.put("media/a.png", b"second")
    assert objects.get("media/a.png") == b"second"
    objects.delete("media/a.png")
    with pytest.raises(NotFound):
        objects.get("media/a.png")
    objects.delete("media/a.png")  # gone already is fine
    objects.delete("never/was.png")


def test_keys_are_listed_by_prefix(objects: ObjectStore) -> None:
    for key in ("media/b.webp", "media/a.png", "inputs/job1-0.png", "inputs/job1-1.png", "inputs/job2-0.png"):
        objects.put(key, key.encode())
    assert objects.keys("media/") == ["media/a.png", "media/b.webp"]
    assert objects.keys("inputs/job1-") == ["inputs/job1-0.png", "inputs/job1-1.png"]
    assert objects.keys("none/") == []


def test_delete_older_than_removes_only_old_objects_under_the_prefix(objects: ObjectStore) -> None:
    objects.put("media/a.png", b"a")
    objects.put("media/b.png", b"b")
    objects.put("inputs/j-0.png", b"j")
    assert objects.delete_older_than("media/", time.time() - 3600) == 0
    assert objects.delete_older_than("media/", time.time() + 3600) == 2
    assert objects.keys("media/") == []
    assert objects.keys("inputs/") == ["inputs/j-0.png"]  # another folder is left alone
    with pytest.raises(InvalidInput):
        objects.delete_older_than("", time.time())  # never everything (locally: the data dir)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_before_any_io(objects: ObjectStore, key: str) -> None:
    for call in (
        lambda: objects.put(key, b"x"),
        lambda: objects.get(key),
        lambda: objects.delete(key),
        lambda: objects.presigned_url(key, 60),
        lambda: objects.local_path(key),
    ):
        with pytest.raises(InvalidInput, match="not a valid object key"):
            call()
    with pytest.raises(InvalidInput):
        objects.keys("../")


def test_missing_object_is_not_found(objects: ObjectStore) -> None:
    with pytest.raises(NotFound):
        objects.get("media/missing.png")


# --- each store's own ---------------------------------------------------------------------------------


def test_local_layout_is_the_data_dir_private_and_written_whole(tmp_path: Path) -> None:
    objects = LocalObjects(tmp_path)
    objects.put("inputs/deep/er/x.png", b"x")
    path = tmp_path / "inputs" / "deep" / "er" / "x.png"
    assert objects.local_path("inputs/deep/er/x.png") == path
    assert path.read_bytes() == b"x"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (tmp_path, tmp_path / "inputs", tmp_path / "inputs" / "deep", path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no draft left behind
    with pytest.raises(NotFound):
        objects.local_path("inputs/none.png")
    assert objects.presigned_url("inputs/deep/er/x.png", 60) is None


def test_local_delete_older_than_goes_by_mtime_and_clears_stale_drafts(tmp_path: Path) -> None:
    objects = LocalObjects(tmp_path)
    objects.put("media/old.png", b"o")
    objects.put("media/new.png", b"n")
    draft = tmp_path / "media" / ".crashed.png.0123"  # a put a crash interrupted
    draft.write_bytes(b"half")
    past = time.time() - 600
    for path in (tmp_path / "media" / "old.png", draft):
        os.utime(path, (past, past))
    assert objects.keys("media/") == ["media/new.png", "media/old.png"]  # drafts are no objects
    assert objects.delete_older_than("media/", time.time() - 60) == 1
    assert sorted(p.name for p in (tmp_path / "media").iterdir()) == ["new.png"]


def test_s3_keys_live_under_the_prefix(s3_objects: S3Objects, s3_media_url: S3Media) -> None:
    s3_objects.put("media/x.png", b"x")
    listed = client(s3_media_url.endpoint).list_objects_v2(Bucket=s3_media_url.bucket)["Contents"]
    assert [entry["Key"] for entry in listed] == [f"{s3_media_url.prefix}/media/x.png"]
    assert s3_objects.local_path("media/x.png") is None


def test_s3_down_is_store_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    objects = S3Objects("bucket", "", client(closed, attempts=1))
    for call in (
        lambda: objects.put("media/x.png", b"x"),
        lambda: objects.get("media/x.png"),
        lambda: objects.keys("media/"),
        lambda: objects.delete_older_than("media/", time.time()),
    ):
        with pytest.raises(StoreUnavailable, match="cannot be reached") as raised:
            call()
        assert raised.value.status == 503


def test_s3_missing_bucket_is_store_unavailable(s3_endpoint: str) -> None:
    objects = S3Objects("no-such-bucket", "", client(s3_endpoint))
    with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
        objects.put("media/x.png", b"x")


def test_open_objects(tmp_path: Path) -> None:
    local = open_objects(None, tmp_path)
    assert isinstance(local, LocalObjects) and local.root == tmp_path
    s3 = open_objects("s3://my-bucket/some/prefix/", tmp_path)
    assert isinstance(s3, S3Objects)
    assert (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix/")
    bare = open_objects("s3://my-bucket", tmp_path)
    assert isinstance(bare, S3Objects) and bare.prefix == ""
    for url in ("file:///tmp/x", "s3://", "s3://B/x", "s3://bucket/../x", "s3://bucket/p?x=1", "/tmp/media"):
        with pytest.raises(InvalidInput, match="--media-url") as raised:
            open_objects(url, tmp_path)
        assert raised.value.param == "--media-url"


# --- media stores on S3 -------------------------------------------------------------------------------


def test_reference_store_round_trips_rgb_images_exactly(s3_objects: S3Objects) -> None:
    references = ReferenceStore(s3_objects)
    images = [random_image(72, 80, seed=1), random_image(64, 64, seed=2)]
    references.save("job1", images)
    assert s3_objects.keys("inputs/") == ["inputs/job1-0.png", "inputs/job1-1.png"]
    loaded = references.load("job1", 2)
    assert [image.mode for image in loaded] == ["RGB", "RGB"]
    for image, back in zip(images, loaded, strict=True):
        assert (pixels(image) == pixels(back)).all()
    references.remove("job1", 2)
    assert s3_objects.keys("inputs/") == []


def test_media_remove_expired_on_s3(s3_objects: S3Objects) -> None:
    store = MediaStore(s3_objects, SECRET, ttl_s=600)
    name = store.save(b"image", ImageFormat.PNG)
    assert store.remove_expired() == 0
    assert store.remove_expired(now=time.time() + 601) == 1
    with pytest.raises(NotFound):
        store.read(name)


class MediaServer:
    """A loopback HTTP server with just the `/media/{name}` route of the real app, on `store`."""

    def __init__(self, store: MediaStore) -> None:
        app = FastAPI()

        @app.get("/media/{name}")
        async def media(name: str, expires: int, signature: str) -> Response:
            return await serve_media(store, name, expires, signature)

        @app.exception_handler(KleinError)
        async def refused(_: Request, exc: Exception) -> Response:
            assert isinstance(exc, KleinError)
            return JSONResponse({"code": exc.code}, status_code=exc.status)

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the media server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def media_server() -> Iterator[list[MediaServer]]:
    started: list[MediaServer] = []
    yield started
    for server in started:
        server.stop()


def test_signed_links_on_s3_are_streamed_by_the_api(
    s3_objects: S3Objects, media_server: list[MediaServer]
) -> None:
    store = MediaStore(s3_objects, SECRET)
    server = MediaServer(MediaStore(s3_objects, SECRET))  # another process's store: only the secret shared
    media_server.append(server)
    png, webp = store.save(b"png bytes", ImageFormat.PNG), store.save(b"webp bytes", ImageFormat.WEBP)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for name, body, media_type in ((png, b"png bytes", "image/png"), (webp, b"webp bytes", "image/webp")):
            served = http.get(store.signed_path(name))
            assert served.status_code == 200
            assert served.content == body
            assert served.headers["content-type"] == media_type
            assert served.headers["content-length"] == str(len(body))

        link = store.signed_path(png)
        assert http.get(link.replace("signature=", "signature=0")).status_code == 403
        assert http.get(store.signed_path(png, now=time.time() - 3600)).status_code == 403
        assert http.get(store.signed_path("no-such.png")).status_code == 404
        assert http.get(store.signed_path("../secret.key")).status_code == 404
        store.remove(png)
        assert http.get(link).status_code == 404  # gone
        other = MediaStore(s3_objects, b"o" * 32)  # a store with another secret cannot make links
        assert http.get(other.signed_path(webp)).status_code == 403


def test_redirect_mode_answers_a_presigned_url(
    s3_objects: S3Objects, s3_media_url: S3Media, media_server: list[MediaServer]
) -> None:
    store = MediaStore(s3_objects, SECRET, ttl_s=600, redirect=True)
    server = MediaServer(store)
    media_server.append(server)
    name = store.save(b"redirected png", ImageFormat.PNG)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        answer = http.get(store.signed_path(name))
        assert answer.status_code == 302
        location = answer.headers["location"]
        assert location.startswith(s3_media_url.endpoint + "/")
        assert "Expires=" in location or "X-Amz-Expires=" in location
        followed = http.get(store.signed_path(name), follow_redirects=True)
        assert followed.status_code == 200
        assert followed.content == b"redirected png"
        assert followed.headers["content-type"] == "image/png"
        assert http.get(store.signed_path(name, now=time.time() - 3600)).status_code == 403
