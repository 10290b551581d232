"""The worker tier: `kleinserve worker` (and each Ray Serve replica, kleinserve/deploy.py), one engine that
claims batches of its model from the shared store under leases."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kleinserve.engine.protocol import LORA_DOWNLOADS, Engine
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.loop import EngineLoop, WorkerSettings
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.postgres import PostgresJobStore
from kleinserve.jobs.store import JobStore
from kleinserve.jobs.writes import EngineWrites
from kleinserve.media import ReferenceStore
from kleinserve.scale import Scale, coordination_for, media_store
from kleinserve.scale.housekeeping import Housekeeper

if TYPE_CHECKING:  # loading (kleinserve.engine: diffusers' pipelines) happens on the engine thread only
    from kleinserve.engine import ModelOptions

log = logging.getLogger(__name__)
PART_STOP_S = 15.0  # how long one part of a draining worker may take to stop (drain())


@dataclass(frozen=True)
class WorkerConfig:
    scale: Scale
    model: ModelOptions  # the model and how to load it, as `kleinserve serve`'s model flags say
    lora_dir: Path | None = None  # named LoRA adapters; downloaded ones come from the shared media
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
            # Each part within PART_STOP_S: a part that hangs is logged by name and left behind (the process
            # is exiting; its leases run out), so that a drain always ends. A SIGSTOPped-then-resumed worker
            # once did not exit within 60 s in tests/scale/test_multiprocess.py; the log names the part.
            stopping = threading.Thread(target=_stop_quietly, args=(stop,), daemon=True)
            stopping.start()
            stopping.join(PART_STOP_S)
            if stopping.is_alive():
                log.error("stopping %s took longer than %g s: left behind", _name(stop), PART_STOP_S)

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
        config, scale = self.config, self.config.scale
        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        store = PostgresJobStore(scale.database_url)
        self._parts.append(store.close)
        media = media_store(scale, store, ttl_s=0)
        engine: Engine = config.model.load(
            lora_dir=config.lora_dir,
            # Always a library: an API process with --allow-lora-urls may send any worker an adapter by hash.
            lora_downloads=scale.data_dir / LORA_DOWNLOADS,
            lora_shared=media.objects,
        )
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


def _stop_quietly(stop: Callable[[], None]) -> None:
    try:
        stop()
    except Exception as exc:  # the store may be gone already: the lease then says it
        log.warning("stopping %s: %s", _name(stop), exc)


def _name(stop: Callable[[], None]) -> str:
    owner = getattr(stop, "__self__", None)
    return f"{type(owner).__name__}.{stop.__name__}" if owner is not None else repr(stop)


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
