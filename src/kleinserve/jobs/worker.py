"""Worker: claims queued jobs, batches compatible ones, runs the engine on its own thread.

    worker = Worker(engine, store, outputs, inputs_dir, hub)
    worker.start()                                   # recovers jobs a crash left running, starts the engine
    # or: worker.start(engine_thread=False), then worker.run_engine() on the thread that loaded the model
    job = worker.submit(request, owner="alice")      # validated, stored, queued (raises Overloaded)
    pending = await worker.enqueue(request, owner="alice")   # the same from the event loop (off it)
    outcome = await worker.wait(pending)             # sync APIs: the job and its image bytes

Batching: the oldest queued job always runs next, together with younger jobs of the same batch key (size,
steps, guidance, text length, reference geometry) up to `max_batch` images, so compatible work shares an
engine call and an older incompatible job never starves. Image encoding and storage happen on an encoder
thread pool, so the engine starts the next batch at once; a synchronous caller gets the encoded bytes from
there in memory (`Outcome`), not by reading them back from the media store. Cancel: a queued job is
cancelled at once; a running job is marked cancelled at the next step boundary (its batch stops when every
job in it is cancelled). What happens at each step: jobs/batch.py; while the store refuses writes (a lock
held elsewhere, a full disk) the engine goes on and /readyz says why: jobs/writes.py.

`kleinserve serve` runs the engine on the thread that loaded the model (`run_engine()`; why: api/server.py's
`serve`); `start()`'s own engine thread remains for embedding and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kleinserve.engine.protocol import Engine
from kleinserve.errors import Cancelled, KleinError, Overloaded, StoreUnavailable, Unavailable
from kleinserve.jobs.batch import BatchSteps, OutputStore, store_result
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.record import JobParams
from kleinserve.jobs.store import Job, JobStatus, JobStore, new_job_id
from kleinserve.jobs.writes import EngineWrites
from kleinserve.media import ReferenceStore
from kleinserve.types import GenerateRequest, GenerateResult, StepCallback

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.5
STORE_RETRY_S = 1.0  # how often the engine tries again while the store refuses writes (jobs/writes.py)


@dataclass(frozen=True)
class Outcome:
    """A job's end as its synchronous caller gets it: the final row and, if it succeeded, its images'
    encoded bytes (the very bytes stored), in order."""

    job: Job
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Pending:
    """A stored, queued job and the future its Outcome arrives on (`Worker.enqueue`, then `Worker.wait`)."""

    job: Job
    ended: asyncio.Future[Outcome]


@dataclass(frozen=True)
class WorkerSettings:
    max_batch: int = 4  # images per engine call
    max_waiting: int = 64  # queued jobs, all keys together
    max_in_flight_per_key: int = 24  # queued + running jobs of one key
    # A job's stored progress (GET /v1/jobs/{id}, polling) lags its steps by at most this; its events
    # carry every step. A save is a SQLite commit: too dear at every step of a fast model (README).
    progress_interval_s: float = 0.5


class Worker:
    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        outputs: OutputStore,
        inputs_dir: Path,
        hub: EventHub,
        settings: WorkerSettings = WorkerSettings(),
        metrics: Metrics | None = None,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.outputs = outputs
        self.references = ReferenceStore(inputs_dir)
        self.hub = hub
        self.settings = settings
        self.metrics = metrics or Metrics(engine)
        self.on_finished = on_finished  # e.g. webhook delivery; called on the encoder thread
        self._wake = threading.Event()
        self._started = threading.Event()  # start() was called: run_engine() may begin
        self._engine_running = threading.Event()
        self._engine_done = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._cancel_requested: set[str] = set()
        self._submit_lock = threading.Lock()
        self._listeners: dict[str, StepCallback] = {}  # in-process step callbacks (streaming APIs)
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}  # submit_and_wait's callers, by job id
        self._accepting = True
        self._warmed = False
        self.writes = EngineWrites(store, on_deferred=self._wake.set)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kleinserve-engine", daemon=True)
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kleinserve-encode")

    # lifecycle
    @property
    def ready(self) -> bool:
        """Warmed up, taking work, its engine loop alive, and the store taking writes."""
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        """Why the worker is not ready (/readyz says it), or None when it is."""
        if self._engine_done.is_set() or self._stopping:
            return "the engine has stopped"
        if not self._accepting:
            return "draining: the server is shutting down"
        if not self._warmed:
            return "starting: the model is warming up"
        if self.writes.refusal is not None:
            return f"the job store is not taking writes ({self.writes.refusal})"
        return None

    def start(self, engine_thread: bool = True) -> None:
        """Recover the jobs a crash left running, then start the engine on its own thread, or (engine_thread
        False) let a waiting `run_engine()` begin."""
        for job in self.store.recover():
            log.warning("job %s was interrupted by a restart: now %s", job.id, job.status.value)
        if engine_thread:
            self._thread.start()
        self._started.set()

    def run_engine(self) -> None:
        """Run the engine on the calling thread, once start(engine_thread=False) was called, until stop()."""
        while not self._started.wait(IDLE_POLL_S):
            if self._stopping:
                return
        self._run()

    def _warm_up(self) -> None:
        """One tiny generation, so that the first request does not pay one-time costs (kernels, allocator)."""
        side = 64
        self.engine.generate(GenerateRequest(prompt="warm-up", width=side, height=side, steps=1, seed=0))
        self._warmed = True

    def drain(self) -> None:
        """Stop intake (new submissions answer 503); queued jobs stay queued for the next start."""
        self._accepting = False

    def wait_idle(self) -> None:
        """Block until no batch is running (after drain(), none will start)."""
        self._idle.wait()

    def stop(self) -> None:
        """Drain, let the running batch finish, end the engine loop (and its thread) and the encoders."""
        self.drain()
        self._stopping = True
        self._wake.set()
        if self._engine_running.is_set():  # on whichever thread it runs: wait until its loop has ended
            self._engine_done.wait()
        if self._thread.is_alive():
            self._thread.join()
        self._encoder.shutdown(wait=True)

    # API side
    def submit(
        self,
        request: GenerateRequest,
        owner: str,
        on_step: StepCallback | None = None,
        *,
        ended: asyncio.Future[Outcome] | None = None,
        **job_fields: Any,
    ) -> Job:
        """Validate, store and queue `request`; `job_fields` (webhook_url, webhook_secret, extra) are stored
        on the job; `ended` (a future of the event loop) gets the job's Outcome."""
        if not self._accepting:
            raise Unavailable("the server is shutting down; try again shortly", retry_after=30)
        if self.writes.refusal is not None:  # at once, rather than after the store's busy timeout
            raise StoreUnavailable(f"the job store is not taking writes ({self.writes.refusal})")
        resolved = self.engine.resolve(request)  # the job's one resolution: the engine thread restores it
        with self._submit_lock:  # the limits are checked and the job added as one step
            limits = self.settings
            waiting, in_flight = self.store.load(owner)
            if waiting >= limits.max_waiting:
                raise Overloaded(f"{waiting} jobs are waiting (limit {limits.max_waiting})", retry_after=5)
            if in_flight >= limits.max_in_flight_per_key:
                raise Overloaded(
                    f"{in_flight} jobs of this key are in flight (limit {limits.max_in_flight_per_key})",
                    retry_after=5,
                )
            job_id = new_job_id()
            try:  # prepared (RGB, resized, cropped): stored losslessly as PNG, and never prepared again
                self.references.save(job_id, resolved.stored.reference_images)
            except OSError as exc:
                self.references.remove(job_id, len(request.reference_images))
                raise StoreUnavailable(f"the reference images cannot be stored ({exc.strerror})") from exc
            job = Job(
                id=job_id,
                owner=owner,
                status=JobStatus.QUEUED,
                params=JobParams.from_resolved(resolved),
                reference_count=len(request.reference_images),
                batch_key=repr(resolved.batch_key),
                created=time.time(),
                **job_fields,
            )
            if on_step is not None:
                self._listeners[job_id] = on_step
            if ended is not None:  # before the job is queued: it cannot end unseen
                self._waiters[job_id] = ended
            try:
                self.store.add(job)
            except BaseException as exc:  # nothing of a job that was never stored stays behind
                self._listeners.pop(job_id, None)
                self._waiters.pop(job_id, None)
                self.references.remove(job_id, len(request.reference_images))
                if isinstance(exc, StoreUnavailable):  # not ready until the engine finds it writable
                    self.writes.refused(exc)
                    self._wake.set()
                raise
        self.metrics.queue_depth.set(waiting + 1)
        self.hub.publish(job_id, {"type": "queued", "position": waiting + 1})
        self._wake.set()
        return job

    async def enqueue(
        self, request: GenerateRequest, owner: str, on_step: StepCallback | None = None
    ) -> Pending:
        """Submit from the event loop (off it: the store may wait on a lock, references are written as PNG
        files) and return the job with the future of its Outcome; raises as `submit` does."""
        ended: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        job = await asyncio.to_thread(self.submit, request, owner, on_step, ended=ended)
        return Pending(job, ended)

    async def wait(self, pending: Pending) -> Outcome:
        """The job's Outcome; cancelling the waiting task cancels the job. No store or file read: every way a
        job ends passes through _terminal, which hands the Outcome over."""
        job = pending.job
        try:
            return await pending.ended
        except asyncio.CancelledError:
            # Not awaited: the caller is being cancelled; the store call runs on a thread meanwhile.
            asyncio.get_running_loop().run_in_executor(None, self._cancel_quietly, job.id, job.owner)
            raise
        finally:
            self._waiters.pop(job.id, None)

    async def submit_and_wait(
        self, request: GenerateRequest, owner: str, on_step: StepCallback | None = None
    ) -> Outcome:
        """`enqueue`, then `wait`."""
        return await self.wait(await self.enqueue(request, owner, on_step))

    def cancel(self, job_id: str, owner: str) -> Job:
        """Cancel a job of `owner`: the row as it is now (cancelled, or running with cancel_requested, to be
        stopped at its next step unless it ends first); NotFound, Conflict for a job that has ended."""
        job = self.store.request_cancel(job_id, owner)
        if job.status is JobStatus.CANCELLED:
            self._terminal(job)
        elif job.status is JobStatus.RUNNING:
            self._cancel_requested.add(job_id)
        return job

    def _cancel_quietly(self, job_id: str, owner: str) -> None:
        """Cancel for a caller that went away: that the job ended meanwhile, or the store refused, is only
        logged (a job whose cancel was lost runs to its end; nobody waits for it)."""
        try:
            self.cancel(job_id, owner)
        except KleinError as exc:
            log.info("cancelling job %s for a departed caller: %s", job_id, exc.message)

    def load_request(self, job: Job) -> GenerateRequest:
        """A job's stored request (`ResolvedRequest.stored`) with its prepared references read back."""
        return job.params.to_request(self.references.load(job.id, job.reference_count))

    # engine thread
    def _run(self) -> None:
        self._engine_running.set()
        try:
            self._loop()
        finally:
            self._engine_done.set()

    def _loop(self) -> None:
        try:
            self._warm_up()
        except Exception:  # the server stays up (and not ready) so that /readyz and the logs say why
            log.exception("warm-up failed: the engine cannot generate; jobs stay queued")
            return
        while not self._stopping:
            self._wake.clear()  # before looking, so that a submit during the look is not missed
            try:
                self.writes.catch_up()
                batch = self._next_batch() if self._accepting else []
            except StoreUnavailable as exc:
                self.writes.refused(exc)
                self._wake.wait(STORE_RETRY_S)
                continue
            if not batch:
                self._wake.wait(IDLE_POLL_S)
                continue
            self._idle.clear()
            try:
                self._run_batch(batch)
            except StoreUnavailable as exc:  # the batch could not be claimed: its jobs stay queued
                self.writes.refused(exc)
            except Exception:  # a bug: logged, and the engine goes on with the next batch
                log.exception("the engine loop failed on jobs %s", [job.id for job in batch])
            finally:
                self._idle.set()

    def _next_batch(self) -> list[Job]:
        queued = self.store.queued()
        self.metrics.queue_depth.set(len(queued))
        if not queued:
            return []
        key = queued[0].batch_key
        batch: list[Job] = []
        images = 0
        for job in queued:
            count = job.params.num_images
            if job.batch_key != key or (batch and images + count > self.settings.max_batch):
                continue
            batch.append(job)
            images += count
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        # A job cancelled between _next_batch() and here is not claimed, and must not run.
        claimed = set(self.store.mark_running([job.id for job in batch]))
        batch = [job for job in batch if job.id in claimed]
        if not batch:
            return
        now = time.time()
        for job in batch:
            self.metrics.queue_wait.observe(now - job.created)
            self.hub.publish(job.id, {"type": "running"})
        steps = BatchSteps(
            batch,
            hub=self.hub,
            writes=self.writes,
            metrics=self.metrics,
            listeners=self._listeners,
            cancel_requested=self._cancel_requested,
            end=self._terminal,
            progress_interval_s=self.settings.progress_interval_s,
        )
        self.metrics.batch_size.observe(steps.images)
        try:
            resolved = [self.engine.restore(self.load_request(job)) for job in batch]
            results = self.engine.generate_batch(resolved, steps, cancelled=steps.cancelled)
        except Cancelled:
            return
        except Exception as exc:
            message = exc.message if isinstance(exc, KleinError) else "internal error in the engine"
            if not isinstance(exc, KleinError):
                log.exception("engine failed on jobs %s", [job.id for job in batch])
            for job in batch:
                if job.id in steps.live:
                    self._terminal(self.writes.finish(job, JobStatus.FAILED, error=message))
            return
        finally:
            self._cancel_requested -= {job.id for job in batch}
        self.metrics.text_encoding.observe(results[0].timings.get("text_encoding", 0.0))
        self.metrics.vae_decode.observe(results[0].timings.get("vae_decode", 0.0))
        for job, result in zip(batch, results, strict=True):
            if job.id in steps.live:
                self._encoder.submit(self._store_result, job, result)

    # encoder threads
    def _store_result(self, job: Job, result: GenerateResult) -> None:
        final, images = store_result(
            job, result, outputs=self.outputs, writes=self.writes, metrics=self.metrics
        )
        self._terminal(final, images)

    def _terminal(self, job: Job, images: tuple[bytes, ...] = ()) -> None:
        """Every way a job ends (`job` is its final row) passes here; `images` are its encoded results."""
        self._listeners.pop(job.id, None)
        self._cancel_requested.discard(job.id)
        self.references.remove(job.id, job.reference_count)  # only needed to (re-)run the job
        self.metrics.jobs.labels(job.status.value).inc()
        event: dict[str, Any] = {"type": job.status.value}
        if job.error:
            event["error"] = job.error
        self.hub.publish(job.id, event)
        if self.on_finished is not None:
            self.on_finished(job)
        # Last: the woken caller's answer then need not wait for this thread's Python work (the GIL).
        if (ended := self._waiters.pop(job.id, None)) is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the caller is gone
                ended.get_loop().call_soon_threadsafe(_settle, ended, Outcome(job, images))


def _settle(ended: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not ended.done():  # a cancelled caller's future is done already
        ended.set_result(outcome)
