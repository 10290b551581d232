"""The scaled-out processes, on PostgreSQL (jobs, keys, usage, webhook outbox) and S3-compatible storage
(media).

    kleinserve api --database-url postgresql://... --media-url s3://bucket/prefix --port 8000   # no weights
    kleinserve worker --database-url postgresql://... --media-url s3://bucket/prefix --model DIR

API processes are stateless: any number run behind a load balancer, each answering for every job. Worker
processes (one per GPU) each load one engine and claim batches of its model (jobs/loop.py) under leases. Every
process runs a `Housekeeper`; the one holding its advisory lock re-queues jobs whose lease ran out (a worker
died: at most MAX_ATTEMPTS runs), and every API process delivers webhooks from the outbox (claimed: each is
sent by one) and deletes expired media. `kleinserve serve` (one box: SQLite, local files, the engine
in-process) is unchanged by any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from kleinserve.api.server import (
    DrainingServer,
    ServerSettings,
    app_with,
    assemble,
    check_binding,
    http_config,
)
from kleinserve.engine.protocol import Engine
from kleinserve.errors import StoreUnavailable
from kleinserve.jobs.batch import result_group
from kleinserve.jobs.coordination import Coordination
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.intake import Intake, ModelResolver
from kleinserve.jobs.loop import EngineLoop, WorkerSettings
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.pg_coordination import Leadership, PostgresCoordination, remove_previews
from kleinserve.jobs.postgres import PostgresJobStore, PostgresKeyStore
from kleinserve.jobs.store import LEASE_S, Job, JobStore, SubmitLimits
from kleinserve.jobs.webhooks import WebhookSender
from kleinserve.jobs.writes import EngineWrites
from kleinserve.logs import LOG_CONFIG
from kleinserve.media import MediaStore, ReferenceStore, media_secret_from_env
from kleinserve.objects import open_objects

log = logging.getLogger(__name__)
HOUSEKEEPING_S = 1.0  # how often the housekeeper looks (expired leases, the outbox, the store's health)
MEDIA_CLEANUP_TICKS = 60  # expired media are looked for every minute
WEBHOOK_CLAIM_S = 300.0  # an outbox claim outlives a delivery's retries (1 + 5 + 30 s, 30 s per attempt)


@dataclass(frozen=True)
class Scale:
    """Where the shared state is: the database, the media (`s3://bucket/prefix`, or None: `data_dir`, one
    machine only) and the leases' length."""

    database_url: str
    media_url: str | None
    data_dir: Path
    lease_s: float = LEASE_S


def media_store(scale: Scale, store: JobStore, ttl_s: int) -> MediaStore:
    """The shared media: links signed with KLEINSERVE_MEDIA_SECRET, else a secret the database keeps, so that
    every API process verifies every other's links."""
    secret = media_secret_from_env() or store.shared_secret("media-links")
    return MediaStore(open_objects(scale.media_url, scale.data_dir), secret, ttl_s)


def coordination_for(scale: Scale, store: JobStore, media: MediaStore, hub: EventHub) -> PostgresCoordination:
    return PostgresCoordination(
        scale.database_url, store, media.objects, hub, media.read, lease_s=scale.lease_s
    )


class Housekeeper:
    """The fleet's periodic duties: whichever process holds the advisory lock (others stand by) re-queues or
    fails jobs whose lease ran out; every process does `duties` of its own (the API's outbox and media). An
    API process also has `writes` checked: after a refused write, whether the store takes writes again (its
    readiness); a worker's engine loop does that itself."""

    def __init__(
        self,
        scale: Scale,
        store: JobStore,
        coordination: Coordination,
        media: MediaStore,
        references: ReferenceStore,
        writes: EngineWrites | None = None,
        duties: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.writes = writes
        self.coordination = coordination
        self.media = media
        self.references = references
        self.duties = duties
        self.leadership = Leadership(scale.database_url, "kleinserve-housekeeper")
        self.served: set[str] = set()  # models some live worker serves, as last read
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kleinserve-housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self.leadership.close()

    def _run(self) -> None:
        while not self._stopping.wait(HOUSEKEEPING_S):
            try:
                self.tick()
            except StoreUnavailable as exc:  # not ready (and intake answers 503 at once) until it is back
                if self.writes is not None:
                    self.writes.refused(exc)
            except Exception:  # a bug: logged; the next tick tries again
                log.exception("housekeeping failed")

    def tick(self) -> None:
        if self.writes is not None:
            self.writes.catch_up()  # raises StoreUnavailable while the store refuses writes
        self.served = self.store.served_models()
        self.duties()  # an API process's outbox, which has a leader of its own (a worker may lead here)
        if not self.leadership.held():
            return
        for job in self.store.requeue_expired():  # rows as changed, with the lost run's fence
            log.warning("job %s lost its worker: now %s", job.id, job.status.value)
            # What the lost run saved but never committed (a worker killed while uploading).
            self.media.remove_group(result_group(job))
            remove_previews(self.media.objects, job.id)
            if job.status.terminal:  # its webhook goes through the outbox
                self.references.remove(job.id, job.reference_count)
                self.coordination.ended(job)


# The API tier


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
    services, webhooks = assemble(settings, model, intake, store, keys, media, hub, resumes=False)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    outbox = Outbox(scale, store, webhooks, media, holder)
    intake.housekeeper = Housekeeper(scale, store, coordination, media, references, writes, outbox.tick)

    @contextlib.asynccontextmanager
    async def duties() -> AsyncIterator[None]:
        coordination.start(accepting=True)
        intake.housekeeper.start()
        try:
            yield
        finally:
            await asyncio.to_thread(intake.housekeeper.stop)
            outbox.close()
            await asyncio.to_thread(coordination.stop)
            await webhooks.aclose()
            store.close()
            keys.close()

    return app_with(services, settings, duties), intake


class Outbox:
    """The API tier's share of housekeeping, done by one API process at a time (an advisory lock of its own:
    workers send no webhooks): webhooks of ended jobs, claimed so that each is sent once even across a change
    of leader (an unsent one is claimed again after WEBHOOK_CLAIM_S), and expired media and previews."""

    def __init__(
        self, scale: Scale, store: JobStore, webhooks: WebhookSender, media: MediaStore, holder: str
    ) -> None:
        self.store = store
        self.webhooks = webhooks
        self.media = media
        self.holder = holder
        self.leadership = Leadership(scale.database_url, "kleinserve-outbox")
        self._ticks = 0

    def tick(self) -> None:
        if not self.leadership.held():
            return
        for job in self.store.claim_webhooks(self.holder, 32, WEBHOOK_CLAIM_S):
            self.webhooks.schedule(job)
        self._ticks += 1
        if self._ticks % MEDIA_CLEANUP_TICKS == 0:
            removed = self.media.remove_expired()
            removed += self.media.objects.delete_older_than("previews/", time.time() - self.media.ttl_s)
            if removed:
                log.info("removed %d expired media objects", removed)

    def close(self) -> None:
        self.leadership.close()


def serve_api(scale: Scale, settings: ServerSettings, model: str) -> None:
    """Serve the API tier until SIGTERM/SIGINT (open requests finish; nothing queued is touched)."""
    from kleinserve.engine import inspect_model

    resolver = inspect_model(model)
    app, intake = create_api_app(scale, settings, resolver)
    config = http_config(app, settings, log_level="info", log_config=LOG_CONFIG)
    DrainingServer(config, intake, resolver.spec.name).run()


# The worker tier


@dataclass(frozen=True)
class WorkerConfig:
    scale: Scale
    model: str = "tiny-random"  # and how to load it: as `kleinserve serve`'s flags (engine.load_pipeline)
    dtype: str | None = None
    device: str | None = None
    quantize: str | None = None
    offload: bool = False
    memory_budget_gib: float | None = None
    components: str | None = None
    download: bool = False
    max_batch: int = WorkerSettings.max_batch
    threads: int | None = None  # torch's CPU threads (None: torch's default)
    worker_id: str | None = None  # default: host:pid:random


class WorkerNode:
    """One engine claiming work of its model from the shared store: `start()` loads and warms it up on an
    engine thread of its own (the thread that loads the model runs it: api/server.py's `serve` says why);
    `health()` says whether it still works; `drain()` stops claiming, lets the batch finish and leaves."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.loop: EngineLoop | None = None
        self._loaded = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kleinserve-engine", daemon=True)
        self._parts: list[Callable[[], None]] = []  # stopped in reverse order by drain()

    def start(self, timeout_s: float | None = None) -> None:
        """Load the model and start claiming once it is warm; raises what loading raised."""
        self._thread.start()
        self._loaded.wait(timeout_s)
        if self._failure is not None:
            raise self._failure
        loop = self.loop
        assert loop is not None
        while not loop.warmed:
            if not self._thread.is_alive() or loop.stopped:
                raise RuntimeError("the engine failed to warm up (see the log)")
            self._thread.join(0.05)
        log.info("worker %s ready for %s", self.worker_id, loop.engine.spec.name)

    def health(self) -> str | None:
        """None while the engine is loaded and its claim loop alive; else why not. A store that refuses writes
        is not the worker's fault: a restart would not help, so it does not count."""
        if self._failure is not None:
            return f"loading the model failed: {self._failure}"
        if self.loop is None or not self.loop.warmed:
            return "starting: the model is loading"
        if not self._thread.is_alive():
            return "the engine loop has stopped"
        return None

    def drain(self, timeout_s: float = 600.0) -> None:
        """Stop claiming, let the running batch finish (up to `timeout_s`), withdraw, stop."""
        if self.loop is not None:
            self.loop.drain()
            finished = threading.Thread(target=self.loop.wait_idle, daemon=True)
            finished.start()
            finished.join(timeout_s)
        for stop in reversed(self._parts):
            try:
                stop()
            except Exception as exc:  # the store may be gone already: the lease then says it
                log.warning("stopping: %s", exc)

    def _run(self) -> None:
        try:
            self.loop = self._build()
        except BaseException as exc:  # re-raised by start() on the caller's thread
            self._failure = exc
            return
        finally:
            self._loaded.set()
        self.loop.run_engine()

    def _build(self) -> EngineLoop:
        from kleinserve.engine import load_pipeline

        config, scale = self.config, self.config.scale
        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        engine: Engine = load_pipeline(
            config.model,
            components=config.components,
            download=config.download,
            device=config.device,
            dtype=config.dtype,
            quantize=config.quantize,
            offload=config.offload,
            memory_budget_gib=config.memory_budget_gib,
        )
        store = PostgresJobStore(scale.database_url)
        self._parts.append(store.close)
        media = media_store(scale, store, ttl_s=0)
        coordination = coordination_for(scale, store, media, EventHub())
        writes = EngineWrites(store, on_deferred=lambda: loop.wake())
        name = engine.spec.name
        references = ReferenceStore(media.objects)
        loop = EngineLoop(
            engine,
            store,
            media,
            references,
            coordination,
            writes,
            WorkerSettings(max_batch=config.max_batch),
            Metrics(engine),
            worker_id=self.worker_id,
            models=[name],
            lease_s=scale.lease_s,
        )
        coordination.wake = loop.wake
        coordination.start(accepting=False)
        self._parts.append(coordination.stop)
        housekeeper = Housekeeper(scale, store, coordination, media, references)
        advertiser = Advertiser(store, self.worker_id, [name], scale.lease_s)
        for part in (housekeeper, advertiser):
            part.start()
            self._parts.append(part.stop)
        self._parts.append(loop.stop)  # last started, first stopped: the batch ends before the rest goes
        loop.start(engine_thread=False)
        return loop


class Advertiser:
    """Tells the store, every third of a lease, that this worker serves `models` (the API's readiness and the
    autoscaler read it); withdraws at stop."""

    def __init__(self, store: JobStore, worker_id: str, models: Sequence[str], lease_s: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.models = list(models)
        self.lease_s = lease_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kleinserve-advertiser", daemon=True)

    def start(self) -> None:
        self.store.advertise(self.worker_id, self.models, self.lease_s)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self.store.retire(self.worker_id)

    def _run(self) -> None:
        while not self._stopping.wait(self.lease_s / 3):
            try:
                self.store.advertise(self.worker_id, self.models, self.lease_s)
            except Exception as exc:
                log.warning("advertising failed: %s", exc)


def queue_depth(database_url: str, models: Sequence[str] | None = None) -> int:
    """Queued jobs (of `models`) in the shared store: what an autoscaler scales on."""
    store = PostgresJobStore(database_url, min_size=1, max_size=1)
    try:
        return store.queue_depth(models)
    finally:
        store.close()
