"""Slow and huge clients against a real server over raw sockets: request head limits (414/431), head and
body timeouts (408), the keep-alive timeout, and the connection cap (503 with Retry-After, /healthz still
answered, the longest-waiting connection over the cap closed to make room)."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from kleinserve.api import limits
from kleinserve.api.connections import RETRY_AFTER_S
from kleinserve.api.limits import OVERFLOW_CONNECTIONS, ConnectionLimits
from tests.api.conftest import RunningServer

StartServer = Callable[..., RunningServer]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def _connect(running: RunningServer) -> socket.socket:
    address = urlsplit(running.base_url)
    return socket.create_connection((address.hostname, address.port), timeout=5)


def _read_until_closed(connection: socket.socket, within_s: float) -> bytes:
    """What the server sends until it closes the connection; fails unless that is within `within_s`."""
    connection.settimeout(within_s)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for over {within_s} s; it sent {received[:200]!r}")
    except ConnectionResetError:
        pass  # closed with data of ours unread: the kernel resets rather than ends the connection
    return received


def _answer(connection: socket.socket, within_s: float = 5) -> Answer:
    """The server's answer, after which it must close the connection within `within_s`."""
    received = _read_until_closed(connection, within_s)
    assert received, "the server closed the connection without an answer"
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return Answer(int(status_line.split(" ")[1]), headers, body)


def _request(running: RunningServer, head: bytes) -> Answer:
    with _connect(running) as connection:
        connection.sendall(head)
        return _answer(connection)


def _assert_serving(running: RunningServer) -> None:
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        assert http.get("/v1/models").status_code == 200


@pytest.fixture
def limited(start_server: StartServer) -> Iterator[Callable[..., RunningServer]]:
    """`limited(head_timeout_s=0.5, ...)`: a server with those ConnectionLimits."""
    yield lambda **limits: start_server(connections=ConnectionLimits(**limits))


def test_a_request_head_over_the_size_limit_is_refused_and_others_are_served(limited: StartServer) -> None:
    running = limited(max_head_bytes=2048)
    big_header = b"X-Big: " + b"a" * 4096 + b"\r\n"
    answer = _request(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big_header + b"\r\n")
    assert answer.status == 431
    assert answer.headers["connection"] == "close"
    assert b"over 2048 bytes" in answer.body
    # Not complete and already too big: answered without waiting for (or buffering) the rest of it.
    assert _request(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big_header[:3000]).status == 431
    long_url = b"GET /healthz?" + b"q" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _request(running, long_url).status == 414
    assert _request(running, long_url[:2500]).status == 414
    _assert_serving(running)


def test_a_request_with_too_many_header_fields_is_refused_and_others_are_served(limited: StartServer) -> None:
    running = limited(max_headers=10)
    fields = b"".join(b"X-Field-%d: %d\r\n" % (n, n) for n in range(10))
    answer = _request(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert answer.status == 431
    assert b"more than 10 header fields" in answer.body
    _assert_serving(running)


def test_a_connection_without_a_complete_head_is_closed_after_the_head_timeout(limited: StartServer) -> None:
    running = limited(head_timeout_s=0.5)
    with _connect(running) as silent, _connect(running) as half, _connect(running) as dripping:
        started = time.monotonic()
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # One byte every 0.1 s: the head timeout counts from the start of the head, not from the last byte.
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 30:  # 7 s at most
            if select.select([dripping], [], [], 0.1)[0]:
                break
            dripping.send(bytes([byte]))
        assert 0.4 < time.monotonic() - started < 3
        _read_until_closed(dripping, within_s=1)
        for connection in (silent, half):
            answer = _answer(connection, within_s=2)
            assert answer.status == 408
            assert b"request head not received within 0.5 s" in answer.body
    _assert_serving(running)


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(limited: StartServer) -> None:
    running = limited(keep_alive_timeout_s=0.5)
    with _connect(running) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        received = _read_until_closed(connection, within_s=2.5)
    assert received.startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started > 0.4


def test_a_stalled_or_endless_body_is_answered_408(limited: StartServer) -> None:
    running = limited(body_idle_timeout_s=0.5, body_timeout_s=1.5)
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    with _connect(running) as stalled, _connect(running) as dripping:
        stalled.sendall(head + b'{"prompt": "')
        dripping.sendall(head)
        started = time.monotonic()
        for _ in range(20):  # a byte every 0.2 s, for 4 s at most: never idle for 0.5 s
            if select.select([dripping], [], [], 0.2)[0]:
                break
            dripping.send(b" ")
        assert 1.3 < time.monotonic() - started < 4
        answer = _answer(dripping, within_s=1)
        assert (answer.status, answer.body) == (408, b"request body not complete within 1.5 s")
        answer = _answer(stalled, within_s=1)
        assert (answer.status, answer.body) == (408, b"request body stalled for 0.5 s")
    _assert_serving(running)


def test_connections_over_the_cap_get_503_while_health_checks_are_answered(limited: StartServer) -> None:
    running = limited(max_connections=4, head_timeout_s=3)
    with ExitStack() as stack:
        # Half-open sockets that send nothing fill the cap (the server accepts in connection order).
        idle = [stack.enter_context(_connect(running)) for _ in range(4)]
        answer = _request(running, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 503
        assert answer.headers["retry-after"] == str(RETRY_AFTER_S)
        assert b"too many connections (limit 4)" in answer.body
        health = _request(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert health.status == 200
        assert health.headers["connection"] == "close"

        # Over the cap, OVERFLOW_CONNECTIONS idle sockets at most wait for their request head: a newer
        # connection closes the oldest of them with the 503, so a health check is still answered.
        waiting = [stack.enter_context(_connect(running)) for _ in range(OVERFLOW_CONNECTIONS)]
        assert _request(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
        assert _answer(waiting[0], within_s=1).status == 503

        # The head timeout frees the cap; then everyone is served again.
        for connection in idle + waiting[1:]:
            assert _answer(connection, within_s=5).status == 408
    _assert_serving(running)


@pytest.mark.parametrize("files", [128, 256, 1024, 65536])
def test_the_default_cap_leaves_the_server_its_files(monkeypatch: pytest.MonkeyPatch, files: int) -> None:
    """Connections served plus those waiting over the cap never reach the open-file limit less the files the
    server needs itself (the issue's attack: 1,100 idle sockets against a limit of 1,024)."""
    monkeypatch.setattr(limits, "open_file_limit", lambda: files)
    cap = ConnectionLimits().connection_cap()
    assert cap >= 1
    assert cap + OVERFLOW_CONNECTIONS + limits.fd_reserve(files) <= files
    assert limits.fd_reserve(files) >= min(limits.FD_RESERVE, files // 4)
    if files == 1024:
        assert cap == 704
