"""Starting the HTTP server: settings, services, the loopback-only rule, uvicorn.

kleinserve serve --model DIR --host 127.0.0.1 --port 8000 --data-dir ./data [--public-url https://host]
    [--lora-dir DIR] [--allow-lora-urls]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI

from kleinserve.api import bfl
from kleinserve.api.app import MAX_BODY_BYTES, build_app
from kleinserve.api.auth import DATABASE_NAME, KeyStore, SqliteKeyStore, check_open_binding
from kleinserve.api.connections import LimitedConfig
from kleinserve.api.limits import ConnectionLimits
from kleinserve.api.loras import AdapterSource
from kleinserve.api.service import Services
from kleinserve.engine.protocol import LORA_DOWNLOADS, AdapterLibrary, Engine
from kleinserve.errors import InvalidInput
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.intake import Intake, ModelResolver
from kleinserve.jobs.store import JobStore, SqliteJobStore
from kleinserve.jobs.webhooks import WebhookSender
from kleinserve.jobs.worker import Worker, WorkerSettings
from kleinserve.logs import LOG_CONFIG, RequestId
from kleinserve.media import MEDIA_TTL_S, ImageFetcher, MediaStore
from kleinserve.outbound import AddressPolicy, OutboundPolicy, Resolver, is_public_address

log = logging.getLogger(__name__)
MEDIA_CLEANUP_INTERVAL_S = 60


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_waiting: int = WorkerSettings.max_waiting
    max_batch: int = WorkerSettings.max_batch
    max_in_flight_per_key: int = WorkerSettings.max_in_flight_per_key
    media_ttl_s: int = MEDIA_TTL_S
    allow_private_urls: bool = False
    insecure_no_auth: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    connections: ConnectionLimits = ConnectionLimits()
    # The origin clients reach the server at ("https://images.example.com", a path prefix allowed) when it is
    # not the one requests arrive at (behind a proxy), for the absolute URLs BFL's answers and webhooks carry.
    # None: the origin each request was made to. Stored without a trailing slash.
    public_url: str | None = None
    # How reference URLs and webhooks resolve names and which addresses count as public (outbound.py);
    # replaced only by tests (a resolver stub on loopback).
    resolver: Resolver = socket.getaddrinfo
    public_address: AddressPolicy = is_public_address
    # The adapters requests may name (`--lora-dir`; None: none), and whether they may give adapter URLs.
    lora_dir: Path | None = None
    allow_lora_urls: bool = False

    def __post_init__(self) -> None:
        if self.public_url is not None:
            object.__setattr__(self, "public_url", _checked_public_url(self.public_url))

    @property
    def lora_downloads(self) -> Path | None:
        """Where the engine keeps adapters downloaded from URLs (`<data dir>/loras/`, by content hash), for
        `load_pipeline`; None when the server applies no adapters (no --lora-dir, no --allow-lora-urls)."""
        applies = self.lora_dir is not None or self.allow_lora_urls
        return self.data_dir / LORA_DOWNLOADS if applies else None


def _checked_public_url(url: str) -> str:
    """`url` without a trailing slash; InvalidInput unless it is an http(s) URL with a host and no query or
    fragment (a path is a prefix the proxy strips)."""
    try:
        parts = urlsplit(url)
        bare = not (parts.query or parts.fragment)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and bare
    except ValueError:  # an unclosed "[" of an IPv6 host
        usable = False
    if not usable:
        raise InvalidInput(
            f"public URL {url!r} is not an http(s) origin",
            param="public_url",
            allowed="http(s)://host[:port][/prefix]",
        )
    return url.rstrip("/")


def check_binding(settings: ServerSettings, keys: KeyStore) -> None:
    """Without any usable API key the server is open, so it may only listen on loopback."""
    check_open_binding(settings.host, keys, settings.insecure_no_auth)


def build_services(settings: ServerSettings, engine: Engine) -> tuple[Services, Worker, WebhookSender]:
    """The one-box routes' services, the worker behind them, and the webhook sender (the last two started and
    stopped with the app)."""
    keys = SqliteKeyStore(settings.data_dir / DATABASE_NAME)
    try:
        check_binding(settings, keys)
    except InvalidInput:
        keys.close()
        raise
    store = SqliteJobStore(settings.data_dir / DATABASE_NAME)
    media = MediaStore.in_data_dir(settings.data_dir, settings.media_ttl_s)
    hub = EventHub()
    worker_settings = WorkerSettings(settings.max_batch, settings.max_waiting, settings.max_in_flight_per_key)
    worker = Worker(engine, store, media, settings.data_dir / "inputs", hub, worker_settings)
    services, webhooks = assemble(settings, engine, worker, store, keys, media, hub, adapters=engine.adapters)
    worker.loop.on_finished = webhooks.schedule
    return services, worker, webhooks


def assemble(
    settings: ServerSettings,
    model: ModelResolver,
    jobs: Intake,
    store: JobStore,
    keys: KeyStore,
    media: MediaStore,
    hub: EventHub,
    *,
    resumes: bool = True,
    adapters: AdapterLibrary | None = None,
) -> tuple[Services, WebhookSender]:
    """The routes' services around a job path, and a webhook sender for its store (one box, or scaled out:
    `resumes` False, an outbox schedules every delivery). `adapters`: the engine's LoRA adapters (None: the
    server applies none)."""
    # One policy; the fetcher and the sender each make their own connection pool from it.
    outbound = OutboundPolicy(settings.allow_private_urls, settings.resolver, settings.public_address)
    fetcher = ImageFetcher(outbound)  # reference images and adapter URLs alike
    services = Services(
        model=model,
        jobs=jobs,
        store=store,
        hub=hub,
        keys=keys,
        media=media,
        fetcher=fetcher,
        loras=AdapterSource(adapters, fetcher, settings.allow_lora_urls),
        public_url=settings.public_url,
    )
    # Only BFL's API takes webhooks; it is also the format of jobs stored before formats were recorded.
    bfl_webhooks = bfl.webhook_format(services)
    webhooks = WebhookSender(
        outbound, store, hub, {bfl.WEBHOOK_FORMAT: bfl_webhooks}, default=bfl_webhooks, resumes=resumes
    )
    return services, webhooks


def create_app(settings: ServerSettings, engine: Engine, engine_thread: bool = True) -> FastAPI:
    """The app with its background duties (engine, media clean-up) tied to its lifespan; with
    `engine_thread` False the engine runs wherever `app.state.worker.run_engine()` is called."""
    services, worker, webhooks = build_services(settings, engine)

    @contextlib.asynccontextmanager
    async def duties() -> AsyncIterator[None]:
        worker.start(engine_thread)
        await webhooks.resume()  # after start(): the jobs its crash recovery failed send theirs too
        cleanup = asyncio.create_task(clean_media(services.media))
        try:
            yield
        finally:
            cleanup.cancel()
            await asyncio.to_thread(worker.stop)
            await webhooks.aclose()  # after the last batch: unsent deliveries stay pending for the next start
            services.store.close()
            services.keys.close()

    app = app_with(services, settings, duties)
    app.state.worker = worker  # for DrainingServer
    return app


def app_with(
    services: Services,
    settings: ServerSettings,
    duties: Callable[[], contextlib.AbstractAsyncContextManager[None]],
) -> FastAPI:
    """The routes of `services` with `duties` (start-up and shutdown of the process's background work) around
    the app's lifespan, once the hub has the event loop."""
    app = build_app(services, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)  # outermost of the app's middleware: its id is in every log line
    inner_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        services.hub.attach(asyncio.get_running_loop())
        async with duties(), inner_lifespan(application):
            yield

    app.router.lifespan_context = lifespan
    return app


async def clean_media(media: MediaStore) -> None:
    """Delete expired result images every MEDIA_CLEANUP_INTERVAL_S, forever (a task of the app)."""
    while True:
        removed = await asyncio.to_thread(media.remove_expired)
        if removed:
            log.info("removed %d expired media files", removed)
        await asyncio.sleep(MEDIA_CLEANUP_INTERVAL_S)


class Drainable(Protocol):
    def drain(self) -> None: ...
    def wait_idle(self) -> None: ...


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: stop intake (new work answers 503), let the running batch finish (a one-box `worker`),
    keep the queue, then exit. A second signal exits at once. `name` is the model, for the ready line."""

    def __init__(self, config: uvicorn.Config, worker: Drainable, name: str) -> None:
        super().__init__(config)
        self.worker = worker
        self.name = name
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("draining: no new work; finishing the running batch")
        self.worker.drain()
        threading.Thread(target=self._exit_when_idle, daemon=True).start()

    def _exit_when_idle(self) -> None:
        self.worker.wait_idle()
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # exits the process when the port cannot be bound
        # Only now, listening: a script that waits for this line may send its first request at once.
        print(f"kleinserve: serving {self.name} at http://{self.config.host}:{self.config.port}/", flush=True)


def http_config(app: FastAPI, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app` on the settings' host and port, under their connection limits;
    `options` are more uvicorn.Config arguments (logging). `serve` and the tests' servers both use it."""
    config = LimitedConfig(app, settings.connections, host=settings.host, port=settings.port, **options)
    log.info("serving at most %d connections at once", config.connection_cap)
    return config


def serve(settings: ServerSettings, load: Callable[[], Engine]) -> None:
    """Load the model and serve until SIGTERM/SIGINT. `load` runs on the engine thread, which then runs the
    engine; HTTP and signals stay on the main thread.

    Which thread runs the engine matters on CPU: torch's OpenMP keeps one thread team per thread that has run
    parallel work, and with the loading thread's team next to the engine thread's the engine ran much slower
    (likely cause, not proven: libgomp then sees more threads than cores and stops spinning between
    parallel regions): about 1.6x slower on a thread of its own (README, Performance).
    """
    loaded: Future[Engine] = Future()
    worker: Future[Worker] = Future()

    def engine() -> None:
        try:
            loaded.set_result(load())
        except BaseException as exc:  # re-raised on the main thread, which reports it
            loaded.set_exception(exc)
            return
        worker.result().run_engine()

    threading.Thread(target=engine, name="kleinserve-engine", daemon=True).start()
    app = create_app(settings, loaded.result(), engine_thread=False)
    worker.set_result(app.state.worker)
    config = http_config(app, settings, log_level="info", log_config=LOG_CONFIG)
    DrainingServer(config, app.state.worker, app.state.worker.engine.spec.name).run()
