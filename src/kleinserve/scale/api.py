"""The API tier: `kleinserve api`, a stateless process that accepts jobs into the shared store and answers for
every job, with no engine (a model's configs only, for its request checks).

LoRA adapters: with `--lora-dir` (the same folder as the workers') an API process lists them and checks the
names requests give; with `--allow-lora-urls` it downloads adapter URLs and puts each file in the shared media
(`loras/<sha256>.safetensors`), where workers fetch it. It has no weights, so an adapter's factor shapes are
checked by the worker that runs the job (a misfit fails that job, naming the adapter), not refused with a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

from fastapi import FastAPI

from kleinserve.api.server import (
    DrainingServer,
    ServerSettings,
    app_with,
    assemble,
    check_binding,
    http_config,
)
from kleinserve.engine.protocol import AdapterLibrary
from kleinserve.engine.resolve import SpecResolver
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.intake import Intake, ModelResolver
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.postgres import PostgresJobStore, PostgresKeyStore
from kleinserve.jobs.store import Job, SubmitLimits
from kleinserve.jobs.writes import EngineWrites
from kleinserve.logs import LOG_CONFIG
from kleinserve.media import ReferenceStore
from kleinserve.scale import Scale, coordination_for, media_store
from kleinserve.scale.housekeeping import Housekeeper, Outbox

log = logging.getLogger(__name__)


class ApiIntake(Intake):
    """Intake of a stateless API process: ready while the store takes writes and some worker serves its
    model."""

    housekeeper: Housekeeper

    @property
    def unready_reason(self) -> str | None:
        if (reason := super().unready_reason) is not None:
            return reason
        name = self.resolver.spec.name
        if name not in self.housekeeper.served:
            return f"no worker serves {name}: its jobs stay queued until one does"
        return None

    def wait_idle(self) -> None:
        """Nothing runs here: a draining API process only finishes its open requests (uvicorn does)."""


def create_api_app(scale: Scale, settings: ServerSettings, model: ModelResolver) -> tuple[FastAPI, ApiIntake]:
    """A stateless API process's app: the dialects over the shared store and media; no engine."""
    store = PostgresJobStore(scale.database_url)
    keys = PostgresKeyStore(scale.database_url)
    check_binding(settings, keys)
    media = media_store(scale, store, settings.media_ttl_s)
    hub = EventHub()
    coordination = coordination_for(scale, store, media, hub)
    references = ReferenceStore(media.objects)
    writes = EngineWrites(store, on_deferred=lambda: None)  # never deferred: an API process writes no ends
    adapters = None
    if settings.lora_downloads is not None:
        adapters = AdapterLibrary(settings.lora_dir, settings.lora_downloads, shared=media.objects)
        model = SpecResolver(model.spec, adapters)

    def end(job: Job) -> None:  # a job cancelled while queued: its outbox entry and events
        references.remove(job.id, job.reference_count)
        coordination.ended(job)

    intake = ApiIntake(
        model,
        store,
        references,
        coordination,
        writes,
        SubmitLimits(settings.max_waiting, settings.max_in_flight_per_key),
        Metrics(),
        end,
        on_submitted=lambda: coordination.queued(model.spec.name),
    )
    services, webhooks = assemble(
        settings, model, intake, store, keys, media, hub, resumes=False, adapters=adapters
    )
    holder = f"{socket.gethostname()}:{os.getpid()}"
    outbox = Outbox(store, webhooks, media, holder)
    intake.housekeeper = Housekeeper(scale, store, coordination, media, references, writes, outbox.tick)

    @contextlib.asynccontextmanager
    async def duties() -> AsyncIterator[None]:
        coordination.start(accepting=True)
        intake.housekeeper.start()
        try:
            yield
        finally:
            await asyncio.to_thread(intake.housekeeper.stop)
            await asyncio.to_thread(coordination.stop)
            await webhooks.aclose()
            store.close()
            keys.close()

    return app_with(services, settings, duties), intake


def serve_api(scale: Scale, settings: ServerSettings, model: str) -> None:
    """Serve the API tier until SIGTERM/SIGINT (open requests finish; nothing queued is touched)."""
    from kleinserve.engine import inspect_model

    resolver = inspect_model(model)
    app, intake = create_api_app(scale, settings, resolver)
    config = http_config(app, settings, log_level="info", log_config=LOG_CONFIG)
    DrainingServer(config, intake, resolver.spec.name).run()
