"""Webhook receivers that misbehave (issue 14, item 5), against a live kleinserve: one that trickles is cut at
the attempt's deadline, a 200 MB answer is not read, and receivers that never answer fill the sender's own
bounded pool, not the reference fetcher's. The receivers are raw loopback sockets, so that each byte written,
and the moment the sender hangs up, is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import kleinserve.media
from kleinserve.jobs import webhooks
from tests.api.conftest import RunningServer
from tests.api.test_webhooks import submit, webhook_status


@dataclass
class Exchange:
    """One connection to a RawReceiver: bytes of answer written, and when the sender hung up."""

    written: int = 0
    cut_after_s: float | None = None  # from the request's arrival to a write failing: the sender had closed


class RawReceiver:
    """A loopback TCP receiver that reads each request, then runs `answer(connection, exchange)` on a thread
    of the connection's own; a write failing (the sender closed) ends the answer and is recorded."""

    def __init__(self, answer: Callable[[Any, Exchange], None]) -> None:
        self.answer = answer
        self.exchanges: list[Exchange] = []
        self.open = 0  # connections with a request in and the answer not ended
        self.most_open = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener was closed
            while True:
                connection, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            head, body = request.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
            while len(body) < length:
                body += connection.recv(65536)
            exchange = Exchange()
            with self._lock:
                self.exchanges.append(exchange)
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            started = time.monotonic()
            try:
                self.answer(connection, exchange)
            except OSError:
                exchange.cut_after_s = time.monotonic() - started
            finally:
                with self._lock:
                    self.open -= 1

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def raw_receivers() -> Iterator[Callable[[Callable[[Any, Exchange], None]], RawReceiver]]:
    started: list[RawReceiver] = []

    def start(answer: Callable[[Any, Exchange], None]) -> RawReceiver:
        started.append(RawReceiver(answer))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


DRIP_S = 0.1  # a byte every DRIP_S: each read gets data long before any per-read timeout


def drip_body(connection: socket.socket, exchange: Exchange) -> None:
    """200 and its headers at once, then a body of a byte per DRIP_S for 10 s."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
    for _ in range(100):
        connection.sendall(b".")
        exchange.written += 1
        time.sleep(DRIP_S)


def drip_headers(connection: socket.socket, exchange: Exchange) -> None:
    """The status line and headers a byte per DRIP_S (10 s in all)."""
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 80 + b"\r\nContent-Length: 0\r\n\r\n":
        connection.sendall(bytes([byte]))
        exchange.written += 1
        time.sleep(DRIP_S)


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [(drip_body, "delivered on attempt 1 (HTTP 200)"), (drip_headers, "failed after 4 attempts")],
)
def test_dripping_receiver_is_cut_at_the_deadline(
    start_server: Callable[..., RunningServer],
    raw_receivers: Callable[..., RawReceiver],
    monkeypatch: pytest.MonkeyPatch,
    answer: Callable[[Any, Exchange], None],
    outcome: str,
) -> None:
    """An attempt has WEBHOOK_TIMEOUT_S in all, however steadily the receiver trickles. A 200 whose body
    trickles is an answer (delivered; the body is not waited for); headers that trickle are no answer."""
    monkeypatch.setattr(webhooks, "WEBHOOK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(webhooks, "RETRY_DELAYS_S", (0.05, 0.05, 0.05))
    receiver = raw_receivers(answer)
    running = start_server(allow_private_urls=True)
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        job = submit(http, webhook_url=receiver.url)
        status = webhook_status(http, job["id"], lambda s: s.startswith(("delivered", "failed")), timeout=8)
    assert status.startswith(outcome), status
    deadline = time.monotonic() + 5
    while any(exchange.cut_after_s is None for exchange in receiver.exchanges):
        assert time.monotonic() < deadline, "the receiver still writes to an open connection"
        time.sleep(0.05)
    cuts = [exchange.cut_after_s for exchange in receiver.exchanges]
    assert len(cuts) == (1 if answer is drip_body else 4)
    # Cut at the deadline: the receiver's next write (at most DRIP_S later) fails.
    assert all(cut is not None and cut < 0.5 + 1.0 for cut in cuts), cuts
    if answer is drip_headers:
        assert "no answer within 0.5 s" in status


HUGE_BYTES = 200 * 1024 * 1024


def huge_answer(connection: socket.socket, exchange: Exchange) -> None:
    """200 with a 200 MB body, written as fast as the sender takes it."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE_BYTES)
    chunk = b"x" * 65536
    while exchange.written < HUGE_BYTES:
        connection.sendall(chunk)
        exchange.written += len(chunk)


def test_huge_answer_is_not_read(
    start_server: Callable[..., RunningServer], raw_receivers: Callable[..., RawReceiver]
) -> None:
    receiver = raw_receivers(huge_answer)
    running = start_server(allow_private_urls=True)
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        job = submit(http, webhook_url=receiver.url)
        status = webhook_status(http, job["id"], lambda s: True)
    assert status.startswith("delivered on attempt 1 (HTTP 200)"), status
    exchange = receiver.exchanges[0]
    deadline = time.monotonic() + 5
    while exchange.cut_after_s is None and exchange.written < HUGE_BYTES:
        assert time.monotonic() < deadline, f"the sender is still reading ({exchange.written} B)"
        time.sleep(0.05)
    # What the sender pulled plus what the kernel's socket buffers held when it hung up (MBs on loopback).
    assert exchange.written < 16 * 1024 * 1024, exchange.written


def hang(connection: socket.socket, exchange: Exchange) -> None:
    """No answer: waits until the sender hangs up."""
    connection.recv(1)


def test_hanging_webhooks_leave_reference_fetches_alone(
    start_server: Callable[..., RunningServer],
    raw_receivers: Callable[..., RawReceiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Webhooks have a bounded pool of their own: receivers that never answer fill it (and no more than it),
    while reference URLs, fetched through the fetcher's own pool, still work."""
    monkeypatch.setattr(webhooks, "WEBHOOK_CONNECTIONS", 4)
    monkeypatch.setattr(kleinserve.media, "URL_MAX_CONNECTIONS", 2)  # a shared pool of either size: full
    receiver = raw_receivers(hang)
    running = start_server(allow_private_urls=True, max_in_flight_per_key=32)
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        for _ in range(6):
            submit(http, webhook_url=receiver.url)
        deadline = time.monotonic() + 20
        while receiver.open < 4:
            assert time.monotonic() < deadline, f"{receiver.open} webhook connections hang"
            time.sleep(0.05)
        made = http.post(
            "/v1/images/generations",
            json={"prompt": "a fox", "size": "256x256", "num_inference_steps": 1, "response_format": "url"},
        )
        reference = made.json()["data"][0]["url"]
        started = time.monotonic()
        for _ in range(3):  # more fetches than the fetcher's connections
            body = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 1, "images": [reference]}
            response = http.post("/v1/images/generations", json=body)
            assert response.status_code == 200, response.text
        assert time.monotonic() - started < 10
    assert receiver.most_open == 4  # bounded: the other two deliveries wait for a turn


def test_at_most_the_read_limit_of_an_answer_is_pulled() -> None:
    """WEBHOOK_READ_BYTES (a few KB), counted at the stream the sender reads from: loopback socket buffers
    hold megabytes, so the receiver's side cannot tell 4 KB from 10 MB."""
    pulled: list[int] = []
    closed = asyncio.Event()

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            try:
                while True:
                    pulled.append(1024)
                    yield b"x" * 1024
            finally:
                closed.set()

    async def read() -> None:
        await webhooks._read_some(httpx.Response(200, stream=Endless()), webhooks.WEBHOOK_READ_BYTES)

    asyncio.run(read())
    assert sum(pulled) == webhooks.WEBHOOK_READ_BYTES
    assert closed.is_set()
