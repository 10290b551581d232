"""The engine side of the job path: claims a batch of compatible queued jobs, runs it, stores the results.

    loop = EngineLoop(engine, store, outputs, references, coordination, writes, settings, worker_id="w1")
    loop.start()        # warm-up, then claim and run until stop(); or start(engine_thread=False) +
    run_engine() loop.wake()         # a job was queued: look now rather than at the next poll

Batching: the oldest queued job always runs next, together with younger jobs of the same model and batch key
(size, steps, guidance, text length, reference geometry) up to `max_batch` images, so compatible work shares
an engine call and an older incompatible job never starves; the store claims the whole batch at once under one
fencing token and a lease (jobs/store.py `claim`). Image encoding and storage happen on an encoder thread
pool, so the engine starts the next batch at once. A result is stored only while the claim is still this
worker's: a worker whose lease was taken over (it stalled; another worker re-ran the job) discards its images.
What happens at each step: jobs/batch.py; while the store refuses writes the loop goes on and says why
(`unready_reason`): jobs/writes.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kleinserve.engine.protocol import Engine
from kleinserve.errors import Cancelled, KleinError, StoreUnavailable
from kleinserve.jobs.batch import BatchSteps, OutputStore, store_result
from kleinserve.jobs.coordination import Coordination
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.store import LEASE_S, Job, JobStatus, JobStore, LeaseLost
from kleinserve.jobs.writes import EngineWrites
from kleinserve.media import ReferenceStore
from kleinserve.types import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.5  # how often an idle loop looks for work it was not woken for (another process queued it)
STORE_RETRY_S = 1.0  # how often the engine tries again while the store refuses writes (jobs/writes.py)


@dataclass(frozen=True)
class WorkerSettings:
    max_batch: int = 4  # images per engine call
    max_waiting: int = 64  # queued jobs, all keys together
    max_in_flight_per_key: int = 24  # queued + running jobs of one key
    # A job's stored progress (GET /v1/jobs/{id}, polling) lags its steps by at most this; its events
    # carry every step. A save is a SQLite commit: too dear at every step of a fast model (README).
    progress_interval_s: float = 0.5


class EngineLoop:
    """Runs `engine` on the jobs of `models` (None: any) that `store` holds; `on_finished` gets every final
    row this loop writes (webhooks of the one-box server), on the encoder or engine thread."""

    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        outputs: OutputStore,
        references: ReferenceStore,
        coordination: Coordination,
        writes: EngineWrites,
        settings: WorkerSettings,
        metrics: Metrics,
        *,
        worker_id: str,
        models: Sequence[str] | None = None,
        lease_s: float = LEASE_S,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.outputs = outputs
        self.references = references
        self.coordination = coordination
        self.writes = writes
        self.settings = settings
        self.metrics = metrics
        self.worker_id = worker_id
        self.models = models
        self.lease_s = lease_s
        self.on_finished = on_finished
        self.claiming = True
        self.warmed = False
        self._wake = threading.Event()
        self._started = threading.Event()  # start() was called: run_engine() may begin
        self._engine_running = threading.Event()
        self._engine_done = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kleinserve-engine", daemon=True)
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kleinserve-encode")

    @property
    def stopped(self) -> bool:
        """The engine loop has ended (stop(), or its warm-up failed)."""
        return self._engine_done.is_set() or self._stopping

    @property
    def unready_reason(self) -> str | None:
        """Why the loop cannot take work now, or None."""
        if self.stopped:
            return "the engine has stopped"
        if not self.claiming:
            return "draining: the server is shutting down"
        if not self.warmed:
            return "starting: the model is warming up"
        if self.writes.refusal is not None:
            return f"the job store is not taking writes ({self.writes.refusal})"
        return None

    def wake(self) -> None:
        self._wake.set()

    def start(self, engine_thread: bool = True) -> None:
        """Start the engine on its own thread, or (engine_thread False) let a waiting `run_engine()` begin."""
        if engine_thread:
            self._thread.start()
        self._started.set()

    def run_engine(self) -> None:
        """Run the engine on the calling thread, once start(engine_thread=False) was called, until stop()."""
        while not self._started.wait(IDLE_POLL_S):
            if self._stopping:
                return
        self._run()

    def drain(self) -> None:
        """Claim no more batches; the running one finishes, queued jobs stay queued."""
        self.claiming = False

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

    def _warm_up(self) -> None:
        """One tiny generation, so that the first request does not pay one-time costs (kernels, allocator)."""
        side = 64
        self.engine.generate(GenerateRequest(prompt="warm-up", width=side, height=side, steps=1, seed=0))
        self.warmed = True

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
                batch = self._claim() if self.claiming else []
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
            except Exception:  # a bug: logged, and the engine goes on with the next batch
                log.exception("the engine loop failed on jobs %s", [job.id for job in batch])
            finally:
                self._idle.set()

    def _claim(self) -> list[Job]:
        batch = self.store.claim(self.worker_id, self.models, self.settings.max_batch, self.lease_s)
        self.metrics.queue_depth.set(self.store.queue_depth(self.models))
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        now = time.time()
        for job in batch:
            self.metrics.queue_wait.observe(now - job.created)
        self.coordination.started(batch)
        steps = BatchSteps(
            batch,
            coordination=self.coordination,
            writes=self.writes,
            metrics=self.metrics,
            end=self.terminal,
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
                    steps.finish(job, JobStatus.FAILED, error=message)
            return
        self.metrics.text_encoding.observe(results[0].timings.get("text_encoding", 0.0))
        self.metrics.vae_decode.observe(results[0].timings.get("vae_decode", 0.0))
        for job, result in zip(batch, results, strict=True):
            if job.id in steps.live:
                self._encoder.submit(self._store_result, job, result)

    # encoder threads
    def _store_result(self, job: Job, result: GenerateResult) -> None:
        try:
            final, images = store_result(
                job, result, outputs=self.outputs, writes=self.writes, metrics=self.metrics
            )
        except LeaseLost:  # store_result removed the images; the job is another worker's now
            log.warning("job %s was taken over by another worker: its result is discarded", job.id)
            return
        self.terminal(final, images)

    def terminal(self, job: Job, images: tuple[bytes, ...] = ()) -> None:
        """Every way a job ends on this side (`job` is its final row) passes here; `images` are its encoded
        results."""
        self.references.remove(job.id, job.reference_count)  # only needed to (re-)run the job
        self.metrics.jobs.labels(job.status.value).inc()
        if self.on_finished is not None:
            self.on_finished(job)
        self.coordination.ended(job, images)
