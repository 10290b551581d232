"""Connection limits for the HTTP server: request head size and field count, head, body and keep-alive
timeouts, and a cap on open connections below the process's open-file limit.

uvicorn (httptools parser, which it picks when installed) leaves these open: it has no limit on a request
head (httptools concatenates a header value of any size in memory), no timeout before the first request of a
connection or inside a head or body (`timeout_keep_alive` runs only between a response and the next request),
and `limit_concurrency` is checked only when a request head is complete, so connections that never send one
pile up until the open-file limit locks everyone out; its 503 has no Retry-After either. `backlog` is only
the kernel's accept queue. LimitedHttpProtocol adds what is missing to uvicorn's httptools protocol; it reads
uvicorn internals (`self.cycle`, `self.url`, `self.headers`, `self.connections`), checked with uvicorn 0.54.

Answers made here are short `text/plain` ones with `connection: close` (they come before any API dialect is
known): 414/431 for a request head over the limits, 408 for a head or body that is too slow, 503 with
Retry-After for a connection over the cap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from kleinserve.api.limits import OVERFLOW_CONNECTIONS, ConnectionLimits

log = logging.getLogger(__name__)

HEALTH_PATH = b"/healthz"
RETRY_AFTER_S = 5


class LimitedConfig(uvicorn.Config):
    """uvicorn's configuration with LimitedHttpProtocol under `limits`; `options` are uvicorn.Config's."""

    def __init__(self, app: Any, limits: ConnectionLimits, **options: Any) -> None:
        super().__init__(
            app,
            http=LimitedHttpProtocol,
            ws="none",  # the app has no WebSocket routes: every connection stays under these limits
            # uvicorn declares an int; it only hands the value to loop.call_later, which takes floats.
            timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]
            **options,
        )
        self.limits = limits
        self.connection_cap = limits.connection_cap()
        # The server's connections over the cap that have not sent a complete request head, oldest first.
        self.waiting_over_cap: dict[LimitedHttpProtocol, None] = {}


@dataclass(frozen=True)
class Answer:
    """A short `text/plain` answer that closes the connection."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def _headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        length = str(len(body)).encode()
        fixed = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", length)]
        return [*fixed, (b"connection", b"close"), *self.headers]

    def app(self) -> ASGIApp:
        """An ASGI app giving this answer to every request: for a request whose head is complete, so that
        uvicorn's request cycle (access log, connection close) handles it like any other."""
        body = self.message.encode()
        headers = self._headers(body)

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": self.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return answer

    def raw(self, default_headers: list[tuple[bytes, bytes]]) -> bytes:
        """The answer on the wire, for a connection without a request cycle to answer through."""
        body = self.message.encode()
        lines = [STATUS_LINE[self.status]]
        for name, value in default_headers + self._headers(body):
            lines += [name, b": ", value, b"\r\n"]
        return b"".join([*lines, b"\r\n", body])


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with ConnectionLimits. Per request it adds a few attribute updates and
    one timer (the head timeout, armed at the request's first byte, cancelled when its head is complete);
    the body timer runs only while a body is arriving, and re-arms itself rather than on every chunk."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, LimitedConfig), "LimitedHttpProtocol needs a LimitedConfig"
        self.limits = config.limits
        self.connection_cap = config.connection_cap
        self.waiting_over_cap = config.waiting_over_cap
        self.over_cap = False
        self.in_head = False  # a request's first byte is parsed, its head is not complete
        self.in_body = False  # a request's head is complete, its body is not
        self.head_bytes = 0  # bytes received while in (or before) a head: an upper bound of its size
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_started = 0.0  # loop.time() of the body's start and its last chunk
        self.body_last = 0.0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.over_cap = len(self.connections) > self.connection_cap
        if self.over_cap:
            if len(self.waiting_over_cap) >= OVERFLOW_CONNECTIONS:
                oldest = next(iter(self.waiting_over_cap))
                del self.waiting_over_cap[oldest]
                oldest._answer_and_close(self._over_cap_answer())
            self.waiting_over_cap[self] = None
        self._arm_head_timer()  # uvicorn has none before a connection's first request

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.in_head and self.head_bytes > self.limits.max_head_bytes:
            # Not complete yet, already too big: answer now rather than buffer the rest.
            self._answer_and_close(self._head_too_large())
        elif self.in_body and self.body_timer is None:
            self.body_started = self.body_last = self.loop.time()
            self.body_timer = self.loop.call_later(self.limits.body_idle_timeout_s, self._check_body)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.waiting_over_cap.pop(self, None)
        super().connection_lost(exc)

    # --- httptools parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.in_head = False
        self.in_body = True
        if self.over_cap:
            self.waiting_over_cap.pop(self, None)
        rejection = self._head_rejection()
        if rejection is not None:  # this connection's app from now on: it answers, then the connection closes
            self.app = rejection.app()
        super().on_headers_complete()
        if self.over_cap:
            self.cycle.keep_alive = False  # a health check over the cap is answered, then let go

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self.body_last = self.loop.time()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_body = False
        self.head_bytes = 0
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    # --- the limits ---

    def _head_rejection(self) -> Answer | None:
        """The answer to a complete request head that is over the limits or over the connection cap."""
        limits = self.limits
        if len(self.headers) > limits.max_headers:
            return Answer(431, f"more than {limits.max_headers} header fields")
        # The request line's URL and the fields with their ": " and CRLF: what a client chooses the size of.
        head_bytes = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if head_bytes > limits.max_head_bytes:
            return self._head_too_large()
        if self.over_cap and self.url.partition(b"?")[0] != HEALTH_PATH:
            return self._over_cap_answer()
        return None

    def _over_cap_answer(self) -> Answer:
        message = f"too many connections (limit {self.connection_cap}); retry after {RETRY_AFTER_S} s"
        return Answer(503, message, ((b"retry-after", str(RETRY_AFTER_S).encode()),))

    def _head_too_large(self) -> Answer:
        limit = self.limits.max_head_bytes
        if len(self.url) > limit:
            return Answer(414, f"request line over {limit} bytes")
        return Answer(431, f"request head over {limit} bytes")

    def _arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request waits behind a response in progress: it gets another head timeout.
            self._arm_head_timer()
            return
        self._answer_and_close(
            Answer(408, f"request head not received within {self.limits.head_timeout_s:g} s")
        )

    def _check_body(self) -> None:
        """The body timer: 408 once the body has stalled too long or taken too long, else check again at
        the earlier of the two deadlines."""
        self.body_timer = None
        if self.transport.is_closing():
            return
        limits = self.limits
        now = self.loop.time()
        cycle = self.cycle
        if not cycle.response_complete and (cycle.waiting_for_100_continue or self.flow.read_paused):
            self.body_last = now  # the app has not asked for (more of) the body yet: not the client's delay
        if now - self.body_last >= limits.body_idle_timeout_s:
            self._answer_and_close(Answer(408, f"request body stalled for {limits.body_idle_timeout_s:g} s"))
        elif now - self.body_started >= limits.body_timeout_s:
            self._answer_and_close(
                Answer(408, f"request body not complete within {limits.body_timeout_s:g} s")
            )
        else:
            deadline = min(
                self.body_last + limits.body_idle_timeout_s, self.body_started + limits.body_timeout_s
            )
            self.body_timer = self.loop.call_later(deadline - now, self._check_body)

    def _answer_and_close(self, answer: Answer) -> None:
        """Give `answer` (unless a response has started: then only close) and close. A request in progress
        sees a disconnect at once, so that its app writes nothing more."""
        log.info("closing a connection from %s with %d: %s", self.client, answer.status, answer.message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(answer.raw(self.server_state.default_headers))
        self.transport.close()
