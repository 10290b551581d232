"""kleinserve's own job API against a live server: GET /v1/jobs/{id}, GET /v1/jobs, per-key visibility,
POST /v1/jobs/{id}/cancel (queued and running) and the Server-Sent Events of GET /v1/jobs/{id}/events.
Jobs are submitted through the BFL route (asynchronous: it answers before the job runs).
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore
from tests.api.conftest import RunningServer

SUBMIT = "/v1/flux-2-klein-4b"
LONG_JOB = {"prompt": "a long job", "width": 1024, "height": 1024, "seed": 1}  # ~2 s on the tiny model


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        yield http


def submit(http: httpx.Client, **body: Any) -> str:
    response = http.post(SUBMIT, json={"prompt": "a job", "width": 64, "height": 64, **body})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def wait_for(
    http: httpx.Client, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job never got there: {job}"
        time.sleep(0.02)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def sse_events(http: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """All events of the stream, until the server ends it (it does after a terminal event)."""
    events = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == name
                events.append((name, data))
    return events


def test_get_job(client: httpx.Client) -> None:
    job_id = submit(client, prompt="a teapot", width=320, height=192, seed=9, output_format="webp")
    job = wait_for(client, job_id, finished)
    assert job["id"] == job_id
    assert job["status"] == "succeeded"
    assert job["progress"] == 1.0
    assert job["error"] is None
    assert job["created"] <= job["started"] <= job["finished"]
    assert job["params"]["prompt"] == "a teapot"
    (image,) = job["result"]["images"]
    assert image["seed"] == 9
    assert (job["result"]["width"], job["result"]["height"]) == (320, 192)
    downloaded = client.get(image["url"])
    assert downloaded.status_code == 200
    with Image.open(io.BytesIO(downloaded.content)) as picture:
        assert (picture.format, picture.size) == ("WEBP", (320, 192))
    usage = job["usage"]
    assert usage["tiles_out"] == 1 and usage["tiles_in"] == 0  # ceil(320/512) * ceil(192/512)
    assert usage["megapixels_out"] == round(320 * 192 / 1e6, 4)
    assert usage["megapixels_in"] == 0.0
    assert usage["steps"] == job["result"]["steps"] > 0
    assert usage["engine_seconds"] > 0
    assert job["webhook_status"] is None


def test_unknown_job_is_404(client: httpx.Client) -> None:
    for method, path in (
        ("GET", "/v1/jobs/nope"),
        ("POST", "/v1/jobs/nope/cancel"),
        ("GET", "/v1/jobs/nope/events"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, (path, response.text)
        assert "message" in response.json()["error"]


def test_list_and_keys(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    keys = SqliteKeyStore(tmp_path / "data-0" / "kleinserve.db")  # start_server's first data dir
    alice, bob = keys.create("alice"), keys.create("bob")
    keys.close()
    running = start_server()
    with (
        httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {alice}"}) as as_alice,
        httpx.Client(base_url=running.base_url, headers={"x-key": bob}) as as_bob,
    ):
        ids = [submit(as_alice, seed=seed) for seed in range(3)]
        for job_id in ids:
            wait_for(as_alice, job_id, finished)
        listed = as_alice.get("/v1/jobs", params={"status": "succeeded", "limit": 2})
        assert listed.status_code == 200
        data = listed.json()["data"]
        assert [job["id"] for job in data] == ids[:0:-1]  # the newest two, newest first
        assert all(job["status"] == "succeeded" for job in data)
        assert as_alice.get("/v1/jobs", params={"status": "queued"}).json()["data"] == []
        bad = as_alice.get("/v1/jobs", params={"status": "sleeping"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"

        # Bob sees none of alice's jobs, by any route.
        assert as_bob.get("/v1/jobs").json()["data"] == []
        assert as_bob.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert as_bob.get(f"/v1/jobs/{ids[0]}/events").status_code == 404
        assert as_bob.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 404
        assert as_bob.get("/v1/get_result", params={"id": ids[0]}).json()["status"] == "Task not found"
        bobs = submit(as_bob)
        assert [job["id"] for job in as_bob.get("/v1/jobs").json()["data"]] == [bobs]
        assert bobs not in [job["id"] for job in as_alice.get("/v1/jobs").json()["data"]]

        # No key at all: 401.
        assert httpx.get(f"{running.base_url}/v1/jobs").status_code == 401


def test_cancel_queued_and_running(client: httpx.Client) -> None:
    running_id = submit(client, **LONG_JOB)
    wait_for(client, running_id, lambda job: job["status"] == "running")
    queued_id = submit(client, seed=2)  # behind the long job (another size: another batch)

    cancelled = client.post(f"/v1/jobs/{queued_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"  # at once
    assert client.get(f"/v1/jobs/{queued_id}").json()["status"] == "cancelled"

    asked = time.monotonic()
    response = client.post(f"/v1/jobs/{running_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] in ("running", "cancelled")
    job = wait_for(client, running_id, finished)
    assert job["status"] == "cancelled", job
    assert job["result"] is None
    assert job["progress"] < 1.0
    assert time.monotonic() - asked < 2.0  # at the next step, not after the whole job

    # Neither ever produced a result; a BFL client sees the end as an Error.
    assert client.get("/v1/get_result", params={"id": queued_id}).json()["status"] == "Error"
    # The engine is free again.
    assert wait_for(client, submit(client), finished)["status"] == "succeeded"


def test_events_stream(client: httpx.Client) -> None:
    blocker = submit(client, prompt="blocker", width=512, height=512)
    watched = submit(client, prompt="watched", width=512, height=384, seed=3)
    events = sse_events(client, watched)
    names = [name for name, _ in events]
    assert names[0] in ("queued", "running"), names
    assert names[-1] == "succeeded"
    steps = [data for name, data in events if name == "step"]
    total = steps[0]["total_steps"]
    assert [data["step"] for data in steps] == list(range(1, total + 1))
    for data in steps:
        assert data["total_steps"] == total
        with Image.open(io.BytesIO(base64.b64decode(data["preview"]))) as preview:
            assert preview.format == "PNG"
            assert max(preview.size) <= 256
            assert preview.size == (256, 192)  # 512x384 scaled down, aspect kept
    wait_for(client, blocker, finished)

    # A finished job: the terminal event at once, and the stream ends.
    started = time.monotonic()
    assert sse_events(client, watched) == [("succeeded", {"type": "succeeded"})]
    assert time.monotonic() - started < 2.0


def test_events_of_a_cancelled_job(client: httpx.Client) -> None:
    running_id = submit(client, **LONG_JOB)
    wait_for(client, running_id, lambda job: job["status"] == "running")
    queued_id = submit(client)
    client.post(f"/v1/jobs/{queued_id}/cancel")
    client.post(f"/v1/jobs/{running_id}/cancel")
    (event,) = sse_events(client, queued_id)
    assert event[0] == "cancelled" and event[1]["error"]
    assert sse_events(client, running_id)[-1][0] == "cancelled"


def test_store_calls_wait_for_a_lock_off_the_event_loop(start_server: Callable[..., RunningServer]) -> None:
    """Another process holds the database's write lock: a submit waits for it (up to the store's busy timeout)
    holding the store, and the job API's and BFL's polls wait behind it, each on a thread of its own, while
    the event loop goes on answering /healthz at once. (On the loop, the polls stalled every request.)"""
    server = start_server()
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        job_id = submit(http)
        wait_for(http, job_id, finished)

    def get(path: str) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=30) as own:
            return own.get(path)

    def submit_alone() -> str:
        with httpx.Client(base_url=server.base_url, timeout=30) as own:
            return submit(own)

    holder = sqlite3.connect(server.settings.data_dir / DATABASE_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with ThreadPoolExecutor(3) as pool:
            blocked_submit = pool.submit(submit_alone)
            time.sleep(0.3)  # the submit now waits for the lock, holding the store
            polls = [pool.submit(get, f"/v1/jobs/{job_id}"), pool.submit(get, f"/v1/get_result?id={job_id}")]
            time.sleep(0.3)  # the polls now wait for the store
            started = time.monotonic()
            health = httpx.get(server.base_url + "/healthz", timeout=30)
            elapsed = time.monotonic() - started
            assert health.status_code == 200
            assert elapsed < 0.3, f"/healthz took {elapsed:.2f} s while the store waited for a lock"
            assert not blocked_submit.done() and not any(poll.done() for poll in polls)
            holder.execute("ROLLBACK")
            assert [poll.result().status_code for poll in polls] == [200, 200]
            assert polls[1].result().json()["status"] == "Ready"
            assert blocked_submit.result()  # accepted once the lock was released
    finally:
        holder.close()
