"""Queue limits and clients that leave, through a real server (tests/api's `start_server`).

"Running" and "waiting" are states the test controls: the engine is held by a job submitted straight to the
server's own Worker with a blocking step callback (a `Gate`), so HTTP requests queue behind it for as long
as the test wants. Clients that leave are raw sockets closed by the test.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from kleinserve.api.auth import SqliteKeyStore
from kleinserve.jobs.store import Job, JobStatus
from kleinserve.jobs.worker import Worker
from kleinserve.types import GenerateRequest
from tests.api import conftest as api_fixtures
from tests.api.conftest import RunningServer
from tests.jobs.gate import WAIT_S, Gate

OPENAI = "/v1/images/generations"
CLOUDFLARE = "/client/v4/accounts/test/ai/run/@cf/black-forest-labs/flux-2-klein-4b"
VERCEL = "/image-model"
STEPS = 4
SIZE = 256  # the smallest size every dialect accepts

# tests/api's server fixtures, for the tests in this directory.
server_pipeline = api_fixtures.server_pipeline
start_server = api_fixtures.start_server


def _body(prompt: str, seed: int = 2) -> dict[str, Any]:
    return {"prompt": prompt, "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS, "seed": seed}


@pytest.fixture
def gates() -> Iterator[Callable[[], Gate]]:
    """Gates that are opened after the test whatever happens, so that the server can stop."""
    made: list[Gate] = []

    def make() -> Gate:
        made.append(Gate())
        return made[-1]

    yield make
    for gate in made:
        gate.release()


def worker_of(server: RunningServer) -> Worker:
    worker = server._server.config.app.state.worker
    assert isinstance(worker, Worker)
    return worker


def hold_engine(server: RunningServer, gate: Gate, size: int = 64, steps: int = STEPS) -> Job:
    """A job straight on the server's worker, holding the engine at its step 1."""
    request = GenerateRequest(prompt="holds the engine", width=size, height=size, steps=steps, seed=1)
    job = worker_of(server).submit(request, owner="test-holder", on_step=gate)
    if not gate.reached.wait(WAIT_S):
        raise AssertionError("the engine never reached the gate")
    return job


def until(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)
    return value


def job_of(server: RunningServer, prompt: str) -> Job | None:
    """The queued job with this prompt, if any."""
    store = worker_of(server).store
    for job in store.queued():
        if job.params.prompt == prompt:
            return store.get(job.id)
    return None


def post_raw(server: RunningServer, body: dict[str, Any], key: str | None = None) -> socket.socket:
    """An OpenAI POST on a raw socket; closing it is the client leaving."""
    address = urlsplit(server.base_url)
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {OPENAI} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    connection = socket.create_connection((address.hostname, address.port))
    connection.sendall(head + payload)
    return connection


def answer_of(connection: socket.socket) -> bytes:
    """The whole HTTP answer on a raw socket (the server closes it, or it is complete)."""
    received = b""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([connection], [], [], 0.5)
        if readable:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if length and len(body) >= int(length[0].split(b":")[1]):
                break
    return received


class Quiet:
    """Collects ERROR records of uvicorn's logger: a client that leaves is not a server error."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler(logging.ERROR)
        self.handler.emit = self.records.append  # type: ignore[method-assign]

    def __enter__(self) -> Quiet:
        logging.getLogger("uvicorn.error").addHandler(self.handler)
        return self

    def __exit__(self, *_: object) -> None:
        logging.getLogger("uvicorn.error").removeHandler(self.handler)


def test_a_full_queue_answers_429_with_retry_after_in_each_dialect(
    start_server: Callable[..., RunningServer], gates: Callable[[], Gate]
) -> None:
    server = start_server(max_waiting=1)
    gate = gates()
    held = hold_engine(server, gate)  # running
    waiting = post_raw(server, _body("waits"))
    try:
        until(lambda: job_of(server, "waits"), "the second request waits")
        with httpx.Client(base_url=server.base_url, timeout=WAIT_S) as client:
            started = time.monotonic()
            openai = client.post(OPENAI, json=_body("refused"))
            assert time.monotonic() - started < 2  # refused at once, not after waiting
            assert openai.status_code == 429, openai.text[:300]
            assert int(openai.headers["retry-after"]) >= 1
            error = openai.json()["error"]
            assert error["code"] == "overloaded"
            assert error["type"] == "invalid_request_error"
            assert "limit 1" in error["message"]

            cloudflare = client.post(CLOUDFLARE, files={"prompt": (None, "x"), "width": (None, str(SIZE))})
            assert cloudflare.status_code == 429, cloudflare.text[:300]
            assert int(cloudflare.headers["retry-after"]) >= 1
            body = cloudflare.json()
            assert body["success"] is False
            assert body["errors"][0]["code"] == 3040

            vercel = client.post(VERCEL, json={"prompt": "x", "size": f"{SIZE}x{SIZE}"})
            assert vercel.status_code == 429, vercel.text[:300]
            assert int(vercel.headers["retry-after"]) >= 1
            assert vercel.json()["error"]["type"] == "rate_limit_exceeded"
            assert "limit 1" in vercel.json()["error"]["message"]

            gate.release()
            assert b" 200 " in answer_of(waiting).split(b"\r\n")[0]  # the waiting one is served
            assert worker_of(server).store.get(held.id).status is JobStatus.SUCCEEDED
            assert client.post(OPENAI, json=_body("after")).status_code == 200  # room again
    finally:
        waiting.close()


def test_a_client_leaving_while_waiting_frees_its_place(
    start_server: Callable[..., RunningServer], gates: Callable[[], Gate]
) -> None:
    server = start_server(max_waiting=1)
    gate = gates()
    store = worker_of(server).store
    with Quiet() as quiet, httpx.Client(base_url=server.base_url, timeout=WAIT_S) as client:
        hold_engine(server, gate)
        leaving = post_raw(server, _body("leaves"))
        left: Job = until(lambda: job_of(server, "leaves"), "the request waits")
        assert client.post(OPENAI, json=_body("refused")).status_code == 429  # the queue is full
        leaving.close()
        # Its place is freed while the engine is still held, not once the engine gets to it.
        until(lambda: store.get(left.id).status is JobStatus.CANCELLED, "the job that left is cancelled")
        assert store.queued() == []
        replacement = post_raw(server, _body("replacement"))
        try:
            until(lambda: job_of(server, "replacement"), "the replacement waits")
            gate.release()
            assert b" 200 " in answer_of(replacement).split(b"\r\n")[0]
        finally:
            replacement.close()
        gone = store.get(left.id)
        assert gone.started is None and gone.attempts == 0  # the work that left never ran
        assert gone.error == "cancelled by the client"
    assert quiet.records == []


def test_a_client_leaving_while_running_is_cancelled_at_the_next_step(
    start_server: Callable[..., RunningServer], gates: Callable[[], Gate]
) -> None:
    server = start_server(max_waiting=4)
    worker = worker_of(server)
    store = worker.store
    first, second = gates(), gates()
    with Quiet() as quiet:
        hold_engine(server, first)
        # Queued together behind the first job, so that they run as one batch held by `second` at step 1.
        companion = worker.submit(
            GenerateRequest(prompt="companion", width=SIZE, height=SIZE, steps=STEPS, seed=3),
            owner="test-holder",
            on_step=second,
        )
        leaving = post_raw(server, _body("leaves"))
        try:
            left: Job = until(lambda: job_of(server, "leaves"), "the request waits")
            assert left.batch_key == companion.batch_key
            first.release()
            if not second.reached.wait(WAIT_S):
                raise AssertionError("the batch never started")
            assert store.get(left.id).status is JobStatus.RUNNING  # at step 1, in the held batch
            leaving.close()
            until(lambda: store.get(left.id).cancel_requested, "the server noticed the client left")
            second.release()
            until(lambda: store.get(left.id).status.terminal, "the job that left ends")
            gone = store.get(left.id)
            assert gone.status is JobStatus.CANCELLED
            assert gone.progress == 2 / STEPS  # stopped after the step it was in, not after all of them
            assert gone.result is None
            until(lambda: store.get(companion.id).status.terminal, "the companion ends")
            assert store.get(companion.id).status is JobStatus.SUCCEEDED
        finally:
            leaving.close()
    assert quiet.records == []


def test_the_per_key_limit_refuses_one_key_and_serves_another(
    tmp_path: Any, start_server: Callable[..., RunningServer], gates: Callable[[], Gate]
) -> None:
    keys = SqliteKeyStore(tmp_path / "data-0" / "kleinserve.db")  # start_server's first data dir
    alice, bob = keys.create("alice"), keys.create("bob")
    keys.close()
    server = start_server(max_in_flight_per_key=1)
    gate = gates()
    hold_engine(server, gate)
    first = post_raw(server, _body("alice's first"), alice)
    second = post_raw(server, _body("bob's"), bob)
    try:
        until(lambda: job_of(server, "alice's first"), "alice's first request waits")
        until(lambda: job_of(server, "bob's"), "bob's request waits")  # another key is still served
        with httpx.Client(base_url=server.base_url, timeout=WAIT_S) as client:
            refused = client.post(
                OPENAI, json=_body("alice's second"), headers={"Authorization": f"Bearer {alice}"}
            )
            assert refused.status_code == 429, refused.text[:300]
            assert int(refused.headers["retry-after"]) >= 1
            assert "of this key" in refused.json()["error"]["message"]
            gate.release()
            assert b" 200 " in answer_of(first).split(b"\r\n")[0]
            assert b" 200 " in answer_of(second).split(b"\r\n")[0]
            again = client.post(
                OPENAI, json=_body("alice's third"), headers={"Authorization": f"Bearer {alice}"}
            )
            assert again.status_code == 200, again.text[:300]  # her first one is done
    finally:
        first.close()
        second.close()
