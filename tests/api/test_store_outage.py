"""A job store locked by another process, seen through HTTP: the event loop keeps answering (/healthz at
once), a request that needs a write gets a clear 503 with Retry-After in its dialect, /readyz says not ready,
and the server serves again when the lock is released. Before, store calls ran on the event loop: a 10 s lock
stalled every request for 9.4 s, and /readyz said ready throughout.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import httpx

from kleinserve.api.auth import DATABASE_NAME
from kleinserve.jobs.store import BUSY_TIMEOUT_S
from tests.api.conftest import RunningServer

GENERATE = {"prompt": "a red square", "size": "256x256", "num_inference_steps": 1}


def test_a_locked_store_answers_503_and_never_stalls_the_loop(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server()
    holder = sqlite3.connect(server.settings.data_dir / DATABASE_NAME, isolation_level=None)
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.post("/v1/images/generations", json=GENERATE).status_code == 200
        holder.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            blocked = threading.Thread(
                target=lambda: answers.append(client.post("/v1/images/generations", json=GENERATE))
            )
            blocked.start()
            time.sleep(0.5)  # the request is now waiting for the store's lock
            health_started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            assert time.monotonic() - health_started < 0.5
            assert client.get("/v1/jobs").status_code == 200  # reads go on (WAL) off the loop
            blocked.join(timeout=BUSY_TIMEOUT_S + 10)
            (refused,) = answers
            assert time.monotonic() - started >= BUSY_TIMEOUT_S - 0.5
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
            error = refused.json()["error"]
            assert error["code"] == "store_unavailable"
            assert "database is locked" in error["message"]
            not_ready = client.get("/readyz")
            assert not_ready.status_code == 503
            assert "the job store is not taking writes" in not_ready.json()["reason"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        deadline = time.monotonic() + 10
        while (ready := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.status_code == 200
        assert client.post("/v1/images/generations", json=GENERATE).status_code == 200
