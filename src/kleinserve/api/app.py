"""build_app: the FastAPI application with every dialect's routes and the one error handler.

Errors are raised anywhere as KleinError (or by FastAPI as validation/HTTP errors) and rendered here, once,
by the dialect that owns the request's path: OpenAI `{"error": {...}}`, Cloudflare's v4 envelope, BFL's
`{"detail": [...]}`. Anything else is a bug: logged with a request id, answered 500 in the same dialect.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kleinserve import logs
from kleinserve.api import bfl, cloudflare, jobs, openai, openapi, vercel
from kleinserve.api.service import JSONBody, Services
from kleinserve.errors import Cancelled, InvalidInput, KleinError, NotFound, PayloadTooLarge
from kleinserve.web import docs
from kleinserve.web import routes as web

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class Dialect:
    prefixes: tuple[str, ...]
    render_error: Callable[[KleinError], Response]


_DIALECTS = (
    Dialect(cloudflare.PREFIXES, cloudflare.render_error),
    Dialect(vercel.PREFIXES, vercel.render_error),
    Dialect(bfl.PREFIXES, bfl.render_error),
    Dialect(jobs.PREFIXES, openai.render_error),  # kleinserve's own API uses the OpenAI error body
    Dialect(openai.PREFIXES, openai.render_error),
)


def _dialect_for(path: str) -> Dialect:
    for dialect in _DIALECTS:
        if path.startswith(dialect.prefixes):
            return dialect
    return _DIALECTS[-1]  # OpenAI's body is the most widely understood default


def as_klein_error(exc: Exception) -> KleinError:
    """Framework errors in kleinserve's vocabulary."""
    if isinstance(exc, KleinError):
        return exc
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "form")]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return InvalidInput(f"malformed JSON body ({message})", param=None, allowed="a JSON object")
        return InvalidInput(f"{param}: {message}" if param else message, param=param)
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFound(f"no route {exc.detail}" if exc.detail != "Not Found" else "no such endpoint")
        error = KleinError(str(exc.detail))
        error.status = exc.status_code
        error.code = "http_error"
        return error
    if isinstance(exc, ClientDisconnect):  # gone mid-body (or its body timed out): nobody reads the answer
        return Cancelled("the client disconnected while sending its request")
    request_id = logs.request_id.get() or secrets.token_hex(8)
    log.exception("unhandled error, request id %s", request_id)
    return KleinError(f"internal error (request id {request_id})")


class BodyLimit:
    """Refuses bodies over `limit` bytes (Content-Length or counted while streaming) with PayloadTooLarge,
    raised inside the route so that the route's dialect renders it."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                raise PayloadTooLarge(
                    f"request body is {int(declared)} bytes; the limit is {self.limit} bytes"
                )
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise PayloadTooLarge(f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def build_app(services: Services, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await services.fetcher.client.aclose()

    app = FastAPI(
        title="kleinserve",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSONBody,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: web/docs.py serves its own
        redoc_url=None,
    )

    async def handle(request: Request, exc: Exception) -> Response:
        response = _dialect_for(request.url.path).render_error(as_klein_error(exc))
        if isinstance(exc, HTTPException) and exc.headers:  # e.g. a 405's Allow: the methods the path takes
            response.headers.update(exc.headers)
        return response

    for kind in (KleinError, RequestValidationError, HTTPException, ClientDisconnect, Exception):
        app.add_exception_handler(kind, handle)

    app.include_router(openai.build_router(services))
    app.include_router(cloudflare.build_router(services))
    app.include_router(vercel.build_router(services))
    app.include_router(jobs.build_router(services))
    app.include_router(bfl.build_router(services))  # last: its POST /v1/{model} matches any one segment
    app.include_router(web.build_router())  # the playground page: no key needed to load it
    app.include_router(docs.build_router(app.title, app.openapi_url or "/openapi.json"))

    @app.get("/media/{name}", include_in_schema=False)
    async def media(name: str, expires: int, signature: str) -> FileResponse:
        return FileResponse(services.media.open(name, expires, signature))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """Ready: the model is loaded and warmed up, and the worker takes work."""
        if (reason := services.worker.unready_reason) is not None:
            return JSONBody({"status": "not ready", "reason": reason}, status_code=503)
        return JSONBody({"status": "ready", "model": services.spec.name})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(services.worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = functools.partial(openapi.document, app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
