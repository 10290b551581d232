"""build_app: the FastAPI application with every dialect's routes and the one error handler.

Errors are raised anywhere as KleinError (or by FastAPI as validation/HTTP errors) and rendered here, once,
by the dialect of the route that matched the request (api/_dialect.py's DialectRoute): OpenAI
`{"error": {...}}`, Cloudflare's v4 envelope, BFL's `{"detail": [...]}`. A path no dialect's route matches is
answered in kleinserve's own body, OpenAI's. Anything else is a bug: logged with a request id, answered 500
in the same body.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kleinserve import logs
from kleinserve.api import bfl, cloudflare, jobs, openai, openapi, service, vercel
from kleinserve.api._dialect import DialectRoute, invalid_input
from kleinserve.api.service import JSONBody, Services
from kleinserve.errors import (
    Cancelled,
    InvalidInput,
    KleinError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from kleinserve.media import MediaStore
from kleinserve.web import docs
from kleinserve.web import routes as web

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 50 * 1024 * 1024


def as_klein_error(exc: Exception) -> KleinError:
    """Any exception in kleinserve's vocabulary: framework errors as the KleinError they mean, a bug as a 500
    that names the request id it is logged under."""
    if isinstance(exc, KleinError):
        return exc
    if isinstance(exc, RequestValidationError):  # a query parameter (routes read their bodies themselves)
        return invalid_input(exc.errors())
    if isinstance(exc, HTTPException):
        return _from_http(exc)
    if isinstance(exc, ClientDisconnect):  # gone mid-body (or its body timed out): nobody reads the answer
        return Cancelled("the client disconnected while sending its request")
    request_id = logs.request_id.get() or secrets.token_hex(8)
    log.exception("unhandled error, request id %s", request_id)
    return KleinError(f"internal error (request id {request_id})")


def _from_http(exc: HTTPException) -> KleinError:
    if exc.status_code == 404:  # no route matches the path
        return NotFound("no such endpoint")
    if exc.status_code == 405:  # a route matches the path, not the method
        allowed = (exc.headers or {}).get("Allow", "")
        return MethodNotAllowed(exc.detail, allowed=tuple(m.strip() for m in allowed.split(",") if m.strip()))
    # The framework's only other refusal here: a 400 for a body it cannot parse (a malformed multipart form).
    return InvalidInput(exc.detail)


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


async def serve_media(media: MediaStore, name: str, expires: int, signature: str) -> Response:
    """A signed result link (`/media/{name}`): the local file, the object's bytes (S3: the link works from
    any API process, whether or not clients can reach the bucket) or, in redirect mode, a 302 to a presigned
    URL. Raises Forbidden (expired, tampered with) or NotFound (gone)."""
    found = await asyncio.to_thread(media.open, name, expires, signature)  # S3: a request
    if found.url is not None:
        return RedirectResponse(found.url, status_code=302)
    if found.path is not None:
        return FileResponse(found.path)
    return Response(found.data, media_type=found.media_type)


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
        error = as_klein_error(exc)
        route = request.scope.get("route")  # set for a 405 too: the route that matched the path
        if isinstance(route, DialectRoute):
            return route.render_error(error)
        return openai.render_error(error)  # kleinserve's own routes and unknown paths

    for kind in (KleinError, RequestValidationError, HTTPException, ClientDisconnect, Exception):
        app.add_exception_handler(kind, handle)

    app.include_router(openai.build_router(services))
    app.include_router(cloudflare.build_router(services))
    app.include_router(vercel.build_router(services))
    app.include_router(jobs.build_router(services))
    # Last: its POST /v1/{model} matches any one segment, so that a path the routers above serve for other
    # methods only (GET /v1/jobs, say) answers their 405, not BFL's, to a DELETE.
    app.include_router(bfl.build_router(services))
    app.include_router(web.build_router())  # the playground page: no key needed to load it
    app.include_router(docs.build_router(app.title, app.openapi_url or "/openapi.json"))

    @app.get(
        "/v1/loras",
        tags=["LoRA adapters"],
        summary="The adapters of --lora-dir that requests may name",
        responses=openapi.errors(openapi.ErrorBody, (401,)),
    )
    async def list_loras(http_request: Request) -> dict[str, Any]:
        """`{"object": "list", "data": [{name, format, rank, targets, bytes}]}`; empty without --lora-dir."""
        service.caller(services, http_request)
        return await services.loras.listing()

    @app.get("/media/{name}", include_in_schema=False)
    async def media(name: str, expires: int, signature: str) -> Response:
        return await serve_media(services.media, name, expires, signature)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """Ready: the model is loaded and warmed up, and the worker takes work."""
        if (reason := services.jobs.unready_reason) is not None:
            return JSONBody({"status": "not ready", "reason": reason}, status_code=503)
        return JSONBody({"status": "ready", "model": services.spec.name})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(services.jobs.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = functools.partial(openapi.document, app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
