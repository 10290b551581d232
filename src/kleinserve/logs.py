"""JSON logs, one object per line, with the id of the request being served.

    configure()                          # root logger (and uvicorn's, via LOG_CONFIG) -> JSON on stderr
    app.add_middleware(RequestId)        # X-Request-ID in and out; request_id in every log line meanwhile

A line: `{"timestamp": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "uvicorn.access",
"message": "...", "request_id": "..."}`, plus `exception` (the traceback) when one was logged, and for
access lines `method`, `path`, `status`.
"""

from __future__ import annotations

import json
import logging
import logging.config
import logging.handlers
import queue
import re
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode("latin-1")
# An incoming id is honoured if it is short and plain (it goes into logs and a response header).
_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("kleinserve_request_id", default=None)


def new_request_id() -> str:
    return secrets.token_hex(16)


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6]
            + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Captured by BackgroundHandler on the thread that logged; the variable itself when formatted there.
        current = getattr(record, "request_id", None) or request_id.get()
        if current is not None:
            entry["request_id"] = current
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            _, method, path, _, status = record.args
            entry.update(method=method, path=path, status=status)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class BackgroundHandler(logging.Handler):
    """Hands each record, with the id of the request being served, to a thread that formats it with
    JsonFormatter and writes it to `stream`. uvicorn logs a request's access line on the event loop between
    the answer's headers and its body, where formatting and writing it took about twice as long as handing
    it over (README, Performance); and a slow stderr reader cannot stall the event loop. close() (called by
    dictConfig's reconfiguration and by logging's exit hook) writes what is queued first."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._writer = logging.StreamHandler(stream if stream is not None else sys.stderr)
        self._writer.setFormatter(JsonFormatter())
        self._listener = logging.handlers.QueueListener(self._records, self._writer)
        self._listener.start()
        self._stopped = False

    def emit(self, record: logging.LogRecord) -> None:
        record.request_id = request_id.get()
        self._records.put_nowait(record)

    def close(self) -> None:
        if not self._stopped:  # close() may come twice (reconfiguration, then exit); stop() only once
            self._stopped = True
            self._listener.stop()
            self._writer.close()
        super().close()


# logging.config.dictConfig for the process: everything (kleinserve, uvicorn, libraries) as JSON on stderr.
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"()": BackgroundHandler}},
    "loggers": {
        "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
        "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
        "uvicorn.access": {"handlers": [], "level": "INFO", "propagate": True},
    },
    "root": {"handlers": ["stderr"], "level": "INFO"},
}


def configure() -> None:
    """JSON logging for the whole process; warnings (the `warnings` module) are logged too."""
    logging.config.dictConfig(LOG_CONFIG)
    logging.captureWarnings(True)


class RequestId:
    """ASGI middleware: the request's id (an acceptable incoming X-Request-ID, else a new random one) is set
    in `request_id` while the request is served and returned as the X-Request-ID response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(_HEADER_KEY, b"").decode("latin-1")
        current = incoming if _VALID_ID.fullmatch(incoming) else new_request_id()
        encoded = current.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER_KEY]
                message = {**message, "headers": [*headers, (_HEADER_KEY, encoded)]}
            await send(message)

        token = request_id.set(current)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
