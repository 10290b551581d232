"""EngineRunner: one request on the engine at a time, a bounded wait queue, and callers that leave.

The first half drives an EngineRunner directly (asyncio.run inside plain tests), with on_step callbacks that
block or sleep so that "running" and "waiting" are states the test controls rather than guesses from timing.
The second half checks the same behaviour through a real server with `max_waiting=1` (the helper behind
tests/api's `start_server`, on this session's pipeline): the 429 in each dialect, and clients that disconnect
(raw sockets closed by the test) while waiting or while running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from kleinserve.api.server import ServerSettings
from kleinserve.api.service import DISCONNECT_POLL_S
from kleinserve.engine import Pipeline
from kleinserve.errors import Overloaded, Unavailable
from kleinserve.jobs.runner import EngineRunner
from kleinserve.types import GenerateRequest, Progress
from tests.api.conftest import RunningServer, _start

LONG_STEPS = 12
WAIT_S = 10  # upper bound for anything the tests wait for; never reached when things work


def _request(prompt: str = "a red circle", steps: int = 2) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, width=64, height=64, steps=steps, seed=1)


class Gate:
    """An on_step callback that holds the engine thread at step 1 until `release()`."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()
        self.steps: list[int] = []

    def __call__(self, progress: Progress) -> None:
        self.steps.append(progress.step)
        self.reached.set()
        if not self.opened.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")

    def release(self) -> None:
        self.opened.set()


class StepLog:
    """An on_step callback that records the steps it saw."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, progress: Progress) -> None:
        self.steps.append(progress.step)


@pytest.fixture
def runner(pipeline: Pipeline) -> Iterator[Callable[[int], EngineRunner]]:
    """`runner(max_waiting)`: a started EngineRunner on the session's pipeline, stopped after the test."""
    started: list[EngineRunner] = []

    def make(max_waiting: int) -> EngineRunner:
        engine = EngineRunner(pipeline, max_waiting=max_waiting)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop()


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


async def _reach(event: threading.Event) -> None:
    if not await asyncio.to_thread(event.wait, WAIT_S):
        raise AssertionError("the engine never reached the expected step")


def test_full_queue_refuses_at_once_with_retry_after(runner: Callable[[int], EngineRunner]) -> None:
    engine = runner(1)
    gate = Gate()

    async def scenario() -> None:
        running = asyncio.ensure_future(engine.generate(_request("first"), gate))
        await _reach(gate.reached)
        waiting = asyncio.ensure_future(engine.generate(_request("second")))
        await _until(lambda: engine.waiting == 1, "the second request waits")
        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await engine.generate(_request("third"))
        assert time.monotonic() - started < 0.5  # refused at once, not after waiting
        assert refused.value.status == 429
        assert refused.value.retry_after >= 1
        assert "queue limit 1" in refused.value.message
        gate.release()
        first, second = await asyncio.gather(running, waiting)
        assert len(first.images) == len(second.images) == 1
        assert engine.waiting == 0
        assert len((await engine.generate(_request("after"))).images) == 1

    asyncio.run(scenario())


def test_caller_leaving_while_waiting_frees_its_place_at_once(runner: Callable[[int], EngineRunner]) -> None:
    engine = runner(1)
    gate = Gate()
    left = StepLog()

    async def scenario() -> None:
        running = asyncio.ensure_future(engine.generate(_request("first"), gate))
        await _reach(gate.reached)
        leaving = asyncio.ensure_future(engine.generate(_request("leaves"), left))
        await _until(lambda: engine.waiting == 1, "the second request waits")
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        # Its place is free while the first request is still running, not only once the engine gets to it.
        assert engine.waiting == 0
        assert not gate.opened.is_set()
        replacement = asyncio.ensure_future(engine.generate(_request("replacement")))
        await _until(lambda: engine.waiting == 1, "the replacement waits")
        gate.release()
        await asyncio.gather(running, replacement)
        assert left.steps == []  # the work of the caller who left never ran

    asyncio.run(scenario())


def test_caller_leaving_while_running_cancels_at_the_next_step(runner: Callable[[int], EngineRunner]) -> None:
    engine = runner(1)
    gate = Gate()

    async def scenario() -> None:
        leaving = asyncio.ensure_future(engine.generate(_request("leaves", steps=LONG_STEPS), gate))
        await _reach(gate.reached)  # step 1 done, the engine thread held inside the callback
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        gate.release()
        after = await engine.generate(_request("next"))
        assert len(after.images) == 1
        assert gate.steps == [1]  # stopped before step 2, not after all 12

    asyncio.run(scenario())


def test_engine_errors_reach_their_caller_and_the_runner_goes_on(
    runner: Callable[[int], EngineRunner],
) -> None:
    engine = runner(4)

    def broken(progress: Progress) -> None:
        raise RuntimeError(f"boom at step {progress.step}")

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="boom at step 1"):
            await engine.generate(_request("broken"), broken)
        assert len((await engine.generate(_request("fine"))).images) == 1

    logging.getLogger("kleinserve.jobs.runner").disabled = True  # the expected "engine failed" traceback
    try:
        asyncio.run(scenario())
    finally:
        logging.getLogger("kleinserve.jobs.runner").disabled = False


def test_the_next_waiting_request_runs_after_a_cancelled_one(runner: Callable[[int], EngineRunner]) -> None:
    """The engine's Cancelled is for the runner: the caller who left gets nothing, the next one its result."""
    engine = runner(2)
    gate = Gate()

    async def scenario() -> None:
        leaving = asyncio.ensure_future(engine.generate(_request("leaves", steps=LONG_STEPS), gate))
        await _reach(gate.reached)
        follower = asyncio.ensure_future(engine.generate(_request("follows")))
        await _until(lambda: engine.waiting == 1, "the follower waits")
        leaving.cancel()
        await asyncio.sleep(0)
        gate.release()
        assert len((await follower).images) == 1
        assert leaving.cancelled()
        assert gate.steps == [1]

    asyncio.run(scenario())


def test_stop_refuses_new_work(pipeline: Pipeline) -> None:
    engine = EngineRunner(pipeline, max_waiting=1)
    engine.start()

    async def scenario() -> None:
        assert len((await engine.generate(_request())).images) == 1
        await asyncio.to_thread(engine.stop)
        with pytest.raises(Unavailable) as refused:
            await engine.generate(_request())
        assert refused.value.status == 503

    asyncio.run(scenario())
    engine.stop()  # idempotent


# --- through the HTTP server -----------------------------------------------------------------------------

OPENAI = "/v1/images/generations"
CLOUDFLARE = "/client/v4/accounts/test/ai/run/@cf/black-forest-labs/flux-2-klein-4b"
VERCEL = "/image-model"
# About 4 s on two CPU cores (~0.3 s a step): "running" for a good while, and cancelled within a step.
LONG_BODY = {"prompt": "a long one", "size": "1024x1024", "num_inference_steps": LONG_STEPS, "seed": 1}
# Noticing a disconnect (DISCONNECT_POLL_S 0.25) + finishing the current step (~0.3 s) + the quick request,
# with room for a busy machine; an uncancelled long request would need 3 s or more.
CANCELLED_WITHIN_S = 2.5
QUICK_BODY = {"prompt": "a quick one", "size": "256x256", "num_inference_steps": 1, "seed": 2}


@pytest.fixture
def busy_server(tmp_path: Path, pipeline: Pipeline) -> Iterator[RunningServer]:
    """A server whose queue holds one waiting request."""
    running = _start(ServerSettings(data_dir=tmp_path / "data", max_waiting=1), pipeline)
    yield running
    running.stop()


def _occupy(base_url: str, body: dict[str, object] = LONG_BODY) -> socket.socket:
    """A long POST to the OpenAI route on a raw socket, accepted by the server (running or waiting: no answer
    within 0.3 s; a 429 because the engine had not yet taken the previous one is retried). Closing the socket
    is the client leaving."""
    address = urlsplit(base_url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {OPENAI} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + WAIT_S
    while True:
        connection = socket.create_connection((address.hostname, address.port))
        connection.sendall(head + payload)
        answered, _, _ = select.select([connection], [], [], 0.3)
        if not answered:
            return connection
        connection.close()
        if time.monotonic() > deadline:
            raise AssertionError("the server never accepted the long request")


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


def test_third_request_gets_429_in_each_dialect(busy_server: RunningServer) -> None:
    base_url = busy_server.base_url
    first = _occupy(base_url)  # running
    second = _occupy(base_url)  # waiting
    try:
        with httpx.Client(base_url=base_url, timeout=WAIT_S) as client:
            openai = client.post(OPENAI, json=QUICK_BODY)
            assert openai.status_code == 429, openai.text[:300]
            assert int(openai.headers["retry-after"]) >= 1
            error = openai.json()["error"]
            assert error["code"] == "overloaded"
            assert error["type"] == "invalid_request_error"
            assert "queue limit 1" in error["message"]

            cloudflare = client.post(CLOUDFLARE, files={"prompt": (None, "x"), "width": (None, "256")})
            assert cloudflare.status_code == 429, cloudflare.text[:300]
            assert int(cloudflare.headers["retry-after"]) >= 1
            body = cloudflare.json()
            assert body["success"] is False
            assert body["errors"][0]["code"] == 3040

            vercel = client.post(VERCEL, json={"prompt": "x", "size": "256x256"})
            assert vercel.status_code == 429, vercel.text[:300]
            assert int(vercel.headers["retry-after"]) >= 1
            assert "queue limit 1" in vercel.json()["error"]["message"]
            first.close()
            second.close()
            # Both left: the engine is free again within about a step (uncancelled: seconds more).
            started = time.monotonic()
            time.sleep(2 * DISCONNECT_POLL_S)  # until the server has noticed
            assert client.post(OPENAI, json=QUICK_BODY).status_code == 200
            assert time.monotonic() - started < CANCELLED_WITHIN_S
    finally:
        first.close()
        second.close()


def test_client_leaving_while_waiting_frees_its_place(busy_server: RunningServer) -> None:
    base_url = busy_server.base_url
    with Quiet() as quiet, httpx.Client(base_url=base_url, timeout=WAIT_S) as client:
        first = _occupy(base_url)  # running
        leaving = _occupy(base_url)  # waiting
        try:
            assert client.post(OPENAI, json=QUICK_BODY).status_code == 429  # the queue is full
            leaving.close()
            time.sleep(2 * DISCONNECT_POLL_S)  # until the server has noticed
            replacement: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: replacement.append(client.post(OPENAI, json=QUICK_BODY)))
            thread.start()
            time.sleep(0.3)
            first.close()  # cancelled at its next step; the replacement runs next, not the work that left
            started = time.monotonic()
            thread.join(WAIT_S)
            assert replacement and replacement[0].status_code == 200, replacement
            assert time.monotonic() - started < CANCELLED_WITHIN_S  # the long work that left never ran
        finally:
            first.close()
            leaving.close()
    assert quiet.records == []


def test_client_leaving_while_running_is_cancelled_at_the_next_step(busy_server: RunningServer) -> None:
    base_url = busy_server.base_url
    with Quiet() as quiet, httpx.Client(base_url=base_url, timeout=WAIT_S) as client:
        leaving = _occupy(base_url)
        time.sleep(0.3)  # 0.6 s after it arrived: a step or two in
        leaving.close()
        started = time.monotonic()
        response = client.post(OPENAI, json=QUICK_BODY)
        assert response.status_code == 200, response.text[:300]
        # Uncancelled, the 1024x1024 12-step work would hold the engine for about 3 s more.
        assert time.monotonic() - started < CANCELLED_WITHIN_S
    assert quiet.records == []
