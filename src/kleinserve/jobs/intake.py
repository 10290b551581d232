"""Intake: the accepting side of the job path. Checks a request, stores it as a queued job under the submit
limits, and hands its caller the job's end; the engine side (jobs/loop.py) runs it, in this process or
another.

    intake = Intake(resolver, store, references, coordination, writes, limits, metrics, end)
    job = intake.submit(request, owner="alice")                # checked, stored, queued (raises Overloaded)
    pending = await intake.enqueue(request, owner="alice")      # the same from the event loop (off it)
    outcome = await intake.wait(pending)                        # sync APIs: the job and its image bytes
    intake.cancel(job.id, "alice")

A job's prepared references are written to the reference store before its row, so a worker that claims it
finds them; a job that could not be stored leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kleinserve.engine.protocol import ModelSpec, ResolvedRequest
from kleinserve.errors import KleinError, StoreUnavailable, Unavailable
from kleinserve.jobs.coordination import WANTS_PREVIEWS, Coordination, Outcome
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.record import JobParams, stored_images
from kleinserve.jobs.store import Job, JobStatus, JobStore, SubmitLimits, new_job_id
from kleinserve.jobs.writes import EngineWrites
from kleinserve.media import ReferenceStore
from kleinserve.types import GenerateRequest, StepCallback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    """A stored, queued job and the future its Outcome arrives on (`Intake.enqueue`, then `Intake.wait`)."""

    job: Job
    ended: asyncio.Future[Outcome]


class ModelResolver(Protocol):
    """What intake needs of a model: its variant and its request checks; no weights (an `Engine` is one)."""

    @property
    def spec(self) -> ModelSpec: ...

    def resolve(self, request: GenerateRequest) -> ResolvedRequest: ...


class Intake:
    """Accepts jobs for one model variant (`resolver.spec`) under `limits`. `writes` tracks whether the store
    takes writes (a refusal answers 503 at once, without the store's busy timeout); `end` gets the final row
    of a job that ends here (cancelled while queued); `on_submitted` is called after each submit, and when one
    met a refusing store (the one-box worker wakes its engine loop, which also watches for the store's
    recovery)."""

    def __init__(
        self,
        resolver: ModelResolver,
        store: JobStore,
        references: ReferenceStore,
        coordination: Coordination,
        writes: EngineWrites,
        limits: SubmitLimits,
        metrics: Metrics,
        end: Callable[[Job], None],
        on_submitted: Callable[[], None] = lambda: None,
    ) -> None:
        self.resolver = resolver
        self.store = store
        self.references = references
        self.coordination = coordination
        self.writes = writes
        self.limits = limits
        self.metrics = metrics
        self.end = end  # a job cancelled while queued ends here: the same path as the engine side's ends
        self.on_submitted = on_submitted  # wakes an in-process engine loop; also after a refused write
        self.accepting = True

    @property
    def unready_reason(self) -> str | None:
        """Why this intake cannot take jobs now (/readyz says it), or None."""
        if not self.accepting:
            return "draining: the server is shutting down"
        if self.writes.refusal is not None:
            return f"the job store is not taking writes ({self.writes.refusal})"
        return None

    def drain(self) -> None:
        """Stop intake: new submissions answer 503."""
        self.accepting = False

    def submit(
        self,
        request: GenerateRequest,
        owner: str,
        on_step: StepCallback | None = None,
        *,
        ended: asyncio.Future[Outcome] | None = None,
        **job_fields: Any,
    ) -> Job:
        """Check, store and queue `request`; `job_fields` (webhook_url, webhook_secret, extra) are stored on
        the job; `on_step` gets its steps, `ended` (a future of the event loop) its Outcome. Raises
        InvalidInput, Overloaded (a limit), Unavailable (draining), StoreUnavailable."""
        if not self.accepting:
            raise Unavailable("the server is shutting down; try again shortly", retry_after=30)
        if self.writes.refusal is not None:  # at once, rather than after the store's busy timeout
            raise StoreUnavailable(f"the job store is not taking writes ({self.writes.refusal})")
        resolved = self.resolver.resolve(request)  # the job's one resolution: the engine side restores it
        if on_step is not None:
            job_fields["extra"] = {**job_fields.get("extra", {}), WANTS_PREVIEWS: True}
        files = stored_images(resolved.stored)
        job = Job(
            id=new_job_id(),
            owner=owner,
            status=JobStatus.QUEUED,
            params=JobParams.from_resolved(resolved),
            reference_count=len(files),
            batch_key=repr(resolved.batch_key),
            created=time.time(),
            model=self.resolver.spec.name,
            **job_fields,
        )
        try:  # prepared (RGB, resized, cropped; a mask binarised): stored losslessly as PNG
            self.references.save(job.id, files)
        except (OSError, StoreUnavailable) as exc:
            self.references.remove(job.id, job.reference_count)
            reason = exc.strerror if isinstance(exc, OSError) else exc.message
            raise StoreUnavailable(f"the reference images cannot be stored ({reason})") from exc
        self.coordination.follow(job.id, on_step, ended)  # before the job is queued: it cannot end unseen
        try:
            load = self.store.submit(job, self.limits)
        except BaseException as exc:  # nothing of a job that was never stored stays behind
            self.coordination.unfollow(job.id)
            self.references.remove(job.id, job.reference_count)
            if isinstance(exc, StoreUnavailable):  # not ready until the store takes writes again
                self.writes.refused(exc)
                self.on_submitted()
            raise
        self.coordination.hub.publish(job.id, {"type": "queued", "position": load.queued + 1})
        self.on_submitted()
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
        """The job's Outcome; cancelling the waiting task cancels the job. No store or file read here: every
        way a job ends passes through `Coordination.ended`, which hands the Outcome over."""
        job = pending.job
        try:
            return await pending.ended
        except asyncio.CancelledError:
            # Not awaited: the caller is being cancelled; the store call runs on a thread meanwhile.
            asyncio.get_running_loop().run_in_executor(None, self._cancel_quietly, job.id, job.owner)
            raise
        finally:
            self.coordination.unfollow(job.id)

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
            self.end(job)
        elif job.status is JobStatus.RUNNING:
            self.coordination.cancel_running(job_id)
        return job

    def _cancel_quietly(self, job_id: str, owner: str) -> None:
        """Cancel for a caller that went away: that the job ended meanwhile, or the store refused, is only
        logged (a job whose cancel was lost runs to its end; nobody waits for it)."""
        try:
            self.cancel(job_id, owner)
        except KleinError as exc:
            log.info("cancelling job %s for a departed caller: %s", job_id, exc.message)
