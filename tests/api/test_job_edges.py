"""The smaller holes of issue 14, item 7, against live servers: private data-dir files, the open server's
job owner that no key can take, what a cancel answer promises, results past the media lifetime, and one pixel
cap for every way of giving a size.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore
from kleinserve.errors import InvalidInput
from kleinserve.media import ReferenceStore
from tests.api.conftest import RunningServer
from tests.conftest import random_image

SUBMIT = "/v1/flux-2-klein-4b"
SMALL = {"prompt": "a small job", "width": 64, "height": 64, "seed": 1}


def _finished(http: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 30
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    return job


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_dir_files_are_private(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    data_dir = tmp_path / "data-0"  # start_server's first data dir
    data_dir.mkdir()
    data_dir.chmod(0o755)  # readable by all, as an older version or a umask of 022 left it
    server = start_server()
    assert server.settings.data_dir == data_dir
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        body = {"prompt": "private", "size": "256x256", "response_format": "url"}
        assert http.post("/v1/images/generations", json=body).status_code == 200
    references = ReferenceStore(data_dir / "inputs")
    references.save("job", [random_image(32, 32, seed=1)])  # as a queued job's references wait
    files = [path for path in data_dir.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {DATABASE_NAME, f"{DATABASE_NAME}-wal", "secret.key", "job-0.png"} <= names
    assert any(path.parent.name == "media" for path in files)
    assert {path.name: oct(_mode(path)) for path in files if _mode(path) != 0o600} == {}
    folders = [data_dir, *(path for path in data_dir.rglob("*") if path.is_dir())]
    assert {str(path): oct(_mode(path)) for path in folders if _mode(path) != 0o700} == {}


def test_open_owner_is_no_key(start_server: Callable[..., RunningServer]) -> None:
    # Jobs made while the server was open belonged to "anonymous": a key created later by that name saw them.
    server = start_server()
    keys = SqliteKeyStore(server.settings.data_dir / DATABASE_NAME)
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            made_open = http.post(SUBMIT, json=SMALL).json()["id"]
            _finished(http, made_open)
            for taken in (
                "(no key)",
                "anonymous",
            ):  # today's open owner, and the one rows of old versions carry
                with pytest.raises(InvalidInput, match="not allowed"):
                    keys.create(taken)
            key = keys.create("alice")
            listed = http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
            assert listed.status_code == 200 and listed.json()["data"] == []
            own = http.get(f"/v1/jobs/{made_open}", headers={"Authorization": f"Bearer {key}"})
            assert own.status_code == 404
    finally:
        keys.close()


def test_a_cancel_says_what_will_happen(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        long_job = http.post(SUBMIT, json={**SMALL, "width": 1024, "height": 1024}).json()["id"]
        deadline = time.monotonic() + 30
        while http.get(f"/v1/jobs/{long_job}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        asked = http.post(f"/v1/jobs/{long_job}/cancel")
        assert asked.status_code == 200
        answer = asked.json()
        # The row as the cancel left it: the engine learns of the cancel only after the answer is made.
        assert (answer["status"], answer["cancel_requested"]) == ("running", True)
        assert "unless it finishes first" in answer["message"]
        assert _finished(http, long_job)["status"] == "cancelled"

        done = http.post(SUBMIT, json=SMALL).json()["id"]
        assert _finished(http, done)["status"] == "succeeded"
        again = http.post(f"/v1/jobs/{done}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "conflict"
        assert "already ended (succeeded)" in again.json()["error"]["message"]
        assert http.get(f"/v1/jobs/{done}").json()["status"] == "succeeded"


def test_results_past_the_media_lifetime_say_they_expired(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(media_ttl_s=1)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        job_id = http.post(SUBMIT, json=SMALL).json()["id"]
        fresh = _finished(http, job_id)
        assert fresh["result"]["expired"] is False and fresh["result"]["images"][0]["url"]
        assert http.get("/v1/get_result", params={"id": job_id}).json()["status"] == "Ready"
        time.sleep(1.2)
        stale = http.get(f"/v1/jobs/{job_id}").json()
        assert stale["status"] == "succeeded"
        assert stale["result"]["expired"] is True
        assert [image["url"] for image in stale["result"]["images"]] == [None]
        polled = http.get("/v1/get_result", params={"id": job_id}).json()
        assert polled["status"] == "Error" and polled["result"] is None
        assert "the result expired" in polled["details"]["error"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/images/generations", {"prompt": "big", "size": "2048x2048"}),
        ("/v1/images/generations", {"prompt": "big", "size": "1536x1024"}),
        ("/v1/images/generations", {"prompt": "big", "width": 2048, "height": 2048}),
        ("/image-model", {"prompt": "big", "n": 1, "size": "2048x2048"}),
    ],
)
def test_one_pixel_cap_for_every_way_of_giving_a_size(server: RunningServer, path: str, body: dict) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 400, answer.text
    assert "at most 1048576 pixels" in answer.json()["error"]["message"]
