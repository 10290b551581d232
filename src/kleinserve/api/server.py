"""Starting the HTTP server: settings, services, the loopback-only rule, uvicorn.

kleinserve serve --model DIR --host 127.0.0.1 --port 8000 --data-dir ./data
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from kleinserve.api.app import MAX_BODY_BYTES, build_app
from kleinserve.api.auth import DATABASE_NAME, KeyStore, check_open_binding
from kleinserve.api.service import Services
from kleinserve.engine.pipeline import Pipeline
from kleinserve.errors import InvalidInput
from kleinserve.jobs.runner import DEFAULT_MAX_WAITING, EngineRunner
from kleinserve.media import MEDIA_TTL_S, ImageFetcher, MediaStore

log = logging.getLogger(__name__)
MEDIA_CLEANUP_INTERVAL_S = 60


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_waiting: int = DEFAULT_MAX_WAITING
    media_ttl_s: int = MEDIA_TTL_S
    allow_private_urls: bool = False
    insecure_no_auth: bool = False
    max_body_bytes: int = MAX_BODY_BYTES


def check_binding(settings: ServerSettings, keys: KeyStore) -> None:
    """Without any usable API key the server is open, so it may only listen on loopback."""
    check_open_binding(settings.host, keys, settings.insecure_no_auth)


def build_services(settings: ServerSettings, pipeline: Pipeline) -> Services:
    keys = KeyStore(settings.data_dir / DATABASE_NAME)
    try:
        check_binding(settings, keys)
    except InvalidInput:
        keys.close()
        raise
    runner = EngineRunner(pipeline, max_waiting=settings.max_waiting)
    return Services(
        runner=runner,
        keys=keys,
        media=MediaStore.in_data_dir(settings.data_dir, settings.media_ttl_s),
        fetcher=ImageFetcher(httpx.AsyncClient(), allow_private=settings.allow_private_urls),
    )


def create_app(settings: ServerSettings, pipeline: Pipeline) -> FastAPI:
    """The app with its background duties (engine thread, media clean-up) tied to its lifespan."""
    services = build_services(settings, pipeline)
    app = build_app(services, max_body_bytes=settings.max_body_bytes)
    inner_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        services.runner.start()
        cleanup = asyncio.create_task(_clean_media(services.media))
        try:
            async with inner_lifespan(application):
                yield
        finally:
            cleanup.cancel()
            await asyncio.to_thread(services.runner.stop)
            services.keys.close()

    app.router.lifespan_context = lifespan
    return app


async def _clean_media(media: MediaStore) -> None:
    while True:
        removed = await asyncio.to_thread(media.remove_expired)
        if removed:
            log.info("removed %d expired media files", removed)
        await asyncio.sleep(MEDIA_CLEANUP_INTERVAL_S)


def serve(settings: ServerSettings, pipeline: Pipeline) -> None:
    app = create_app(settings, pipeline)
    print(f"kleinserve: serving {pipeline.spec.name} at http://{settings.host}:{settings.port}/", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
