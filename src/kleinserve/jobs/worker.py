"""The one-box worker (`kleinserve serve`): intake and engine loop in one process, coordinated in memory.

    worker = Worker(engine, store, outputs, inputs_dir, hub)
    worker.start()                                   # recovers jobs a crash left running, starts the engine
    # or: worker.start(engine_thread=False), then worker.run_engine() on the thread that loaded the model
    job = worker.submit(request, owner="alice")      # checked, stored, queued (raises Overloaded)
    pending = await worker.enqueue(request, owner="alice")   # the same from the event loop (off it)
    outcome = await worker.wait(pending)             # sync APIs: the job and its image bytes

It is an `Intake` (jobs/intake.py: submit, wait, cancel) whose jobs its own `EngineLoop` (jobs/loop.py: claim,
batch, run, store) runs, woken at each submit, through a `LocalCoordination` (jobs/coordination.py: callbacks,
futures and cancel flags in memory). On one box every job found `running` at start-up was interrupted by a
crash of this very process: `start()` re-queues it (once; then it fails with the reason). The scaled-out
processes (kleinserve/scale/) run the two halves apart, on PostgreSQL, with leases instead.

`kleinserve serve` runs the engine on the thread that loaded the model (`run_engine()`; why: api/server.py's
`serve`); `start()`'s own engine thread remains for embedding and tests.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

from kleinserve.engine.protocol import Engine
from kleinserve.jobs.batch import OutputStore
from kleinserve.jobs.coordination import LocalCoordination
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.intake import Intake
from kleinserve.jobs.loop import EngineLoop, WorkerSettings
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.store import Job, JobStore, SubmitLimits
from kleinserve.jobs.writes import EngineWrites
from kleinserve.media import ReferenceStore
from kleinserve.types import GenerateRequest

log = logging.getLogger(__name__)
__all__ = ["Worker", "WorkerSettings"]


class Worker(Intake):
    """Intake plus the engine loop that runs its jobs; `on_finished` gets every final row (webhooks)."""

    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        outputs: OutputStore,
        inputs_dir: Path,
        hub: EventHub,
        settings: WorkerSettings | None = None,
        metrics: Metrics | None = None,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        settings = settings or WorkerSettings()
        self.engine = engine
        self.hub = hub
        self.metrics = metrics or Metrics(engine)
        writes = EngineWrites(store, on_deferred=lambda: self.loop.wake())
        coordination = LocalCoordination(hub, writes)
        references = ReferenceStore(inputs_dir)
        self.loop = EngineLoop(
            engine,
            store,
            outputs,
            references,
            coordination,
            writes,
            settings,
            self.metrics,
            worker_id=f"{socket.gethostname()}:serve",
            on_finished=on_finished,
        )
        limits = SubmitLimits(settings.max_waiting, settings.max_in_flight_per_key)
        super().__init__(
            engine,
            store,
            references,
            coordination,
            writes,
            limits,
            self.metrics,
            self.loop.terminal,
            self._submitted,
        )

    def _submitted(self) -> None:
        self.metrics.queue_depth.inc()  # the engine loop sets the exact figure at its next claim
        self.loop.wake()

    @property
    def ready(self) -> bool:
        """Warmed up, taking work, its engine loop alive, and the store taking writes."""
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        """Why the worker is not ready (/readyz says it), or None when it is."""
        return self.loop.unready_reason

    def start(self, engine_thread: bool = True) -> None:
        """Re-queue (or fail) the jobs a crash left running, then start the engine on its own thread, or
        (engine_thread False) let a waiting `run_engine()` begin."""
        for job in self.store.recover():
            log.warning("job %s was interrupted by a restart: now %s", job.id, job.status.value)
        self.loop.start(engine_thread)

    def run_engine(self) -> None:
        self.loop.run_engine()

    def drain(self) -> None:
        """Stop intake (new submissions answer 503) and claiming; queued jobs stay queued for the next
        start."""
        super().drain()
        self.loop.drain()

    def wait_idle(self) -> None:
        self.loop.wait_idle()

    def stop(self) -> None:
        """Drain, let the running batch finish, end the engine loop (and its thread) and the encoders."""
        self.drain()
        self.loop.stop()

    def load_request(self, job: Job) -> GenerateRequest:
        return self.loop.load_request(job)
