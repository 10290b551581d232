"""The coordination seam: what the side that accepted a job (`Intake`, in an API process) and the side that
runs it (`EngineLoop`, in a worker) tell each other beyond the job's row: its step events and previews, its
in-process step listener, its synchronous caller's wait, and a running job's cancel.

    coordination.follow(job_id, on_step, ended)      # accepting side, before the job is stored
    coordination.cancel_running(job_id)              # the store flagged a running job's cancel
    check = coordination.step(batch, fence, progress, save_progress)   # running side, at each step
    coordination.ended(job, images)                  # running side, every way a job ends

Two implementations. `LocalCoordination`: both sides in one process (`kleinserve serve`): in-memory flags,
futures and callbacks, no extra latency; it is what ran before the seam existed. `PostgresCoordination`
(jobs/pg_coordination.py): sides in different processes on one PostgreSQL database, through LISTEN/NOTIFY (one
notify per batch step) with the store's rows as the polled fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from kleinserve.jobs.events import EventHub
from kleinserve.jobs.store import Job, StepCheck
from kleinserve.jobs.writes import EngineWrites
from kleinserve.types import Progress, StepCallback

# The key of Job.extra that marks a job whose submitter listens to its steps (a streaming caller): its worker
# stores previews from the first step on, without waiting for a watch to reach it (pg_coordination).
WANTS_PREVIEWS = "previews"


@dataclass(frozen=True)
class Outcome:
    """A job's end as its synchronous caller gets it: the final row and, if it succeeded, its images' encoded
    bytes (the very bytes stored), in order."""

    job: Job
    images: tuple[bytes, ...] = ()


class Coordination(Protocol):
    """See the module docstring. Accepting-side methods are called from any thread; running-side ones from
    the engine thread (`step`) and the encoder threads (`ended`)."""

    hub: EventHub  # this process's event subscribers (SSE streams)

    # accepting side
    def follow(
        self, job_id: str, on_step: StepCallback | None, ended: asyncio.Future[Outcome] | None
    ) -> None:
        """Before `job_id` is stored: its steps go to `on_step` (with its own images' preview), its end to
        `ended` (a future of the caller's event loop)."""
        ...

    def unfollow(self, job_id: str) -> None:
        """Forget `follow`'s callback and future (the job was never stored, or its caller left)."""
        ...

    def cancel_running(self, job_id: str) -> None:
        """The store has flagged running `job_id`'s cancel: its engine stops it at its next step."""
        ...

    # running side
    def started(self, batch: Sequence[Job]) -> None:
        """The claimed batch is about to run: its `running` events."""
        ...

    def step(self, batch: BatchProgress, progress: Progress) -> StepCheck:
        """At each denoising step of `batch`: keep its claim, save progress when `batch.save_progress`,
        deliver step events, previews and listeners' progress; returns which jobs were cancelled or lost
        meanwhile."""
        ...

    def ended(self, job: Job, images: tuple[bytes, ...] = ()) -> None:
        """Every way a job ends passes here once, with its final row and (succeeded) its encoded images."""
        ...


@dataclass
class BatchProgress:
    """A running batch as `Coordination.step` sees it: `counts` are (job id, image count) in the engine's
    image order, `live` the ids whose images are still wanted, `fence` the claim's token, `done` the fraction
    of steps done, `save_progress` whether this step's progress should be stored."""

    counts: list[tuple[str, int]]
    live: set[str]
    fence: int
    done: float = 0.0
    save_progress: bool = False


def step_event(progress: Progress) -> dict[str, Any]:
    return {"type": "step", "step": progress.step, "total_steps": progress.total_steps}


def end_event(job: Job) -> dict[str, Any]:
    event: dict[str, Any] = {"type": job.status.value}
    if job.error:
        event["error"] = job.error
    return event


def own_progress(progress: Progress, decoded: Callable[[], list[Any]], offset: int, count: int) -> Progress:
    """`progress` as one job of a batch sees it: its preview holds only that job's `count` images."""
    return replace(progress, preview=functools.partial(lambda o, c: decoded()[o : o + c], offset, count))


def settle(ended: asyncio.Future[Outcome], outcome: Outcome) -> None:
    """Hand `outcome` to a waiting caller, from any thread; a caller whose loop closed is gone."""

    def _set() -> None:
        if not ended.done():  # a cancelled caller's future is done already
            ended.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop is closed
        ended.get_loop().call_soon_threadsafe(_set)


class Followers:
    """The accepting side's in-process part, the same in both coordinations: each followed job's step listener
    and waiting caller, by job id."""

    def __init__(self) -> None:
        self._listeners: dict[str, StepCallback] = {}
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}

    def follow(
        self, job_id: str, on_step: StepCallback | None, ended: asyncio.Future[Outcome] | None
    ) -> None:
        if on_step is not None:
            self._listeners[job_id] = on_step
        if ended is not None:
            self._waiters[job_id] = ended

    def unfollow(self, job_id: str) -> None:
        self._listeners.pop(job_id, None)
        self._waiters.pop(job_id, None)


class LocalCoordination(Followers):
    """Both sides in one process: flags, callbacks and futures in memory; progress through `writes` (the one
    box's store writes, deferred while the store refuses them: jobs/writes.py)."""

    def __init__(self, hub: EventHub, writes: EngineWrites) -> None:
        super().__init__()
        self.hub = hub
        self.writes = writes
        self._cancel_requested: set[str] = set()

    def cancel_running(self, job_id: str) -> None:
        self._cancel_requested.add(job_id)

    def started(self, batch: Sequence[Job]) -> None:
        for job in batch:
            self.hub.publish(job.id, {"type": "running"})

    def step(self, batch: BatchProgress, progress: Progress) -> StepCheck:
        cancelled = frozenset(batch.live & self._cancel_requested)
        live = batch.live - cancelled
        decoded = functools.cache(progress.preview)  # one VAE pass per step, whoever asks
        previews = self.hub.previews(decoded, batch.counts, live)
        offset = 0
        for job_id, count in batch.counts:
            if job_id in live:
                if batch.save_progress:
                    self.writes.progress(job_id, batch.done)
                self.hub.publish(job_id, {**step_event(progress), **previews.get(job_id, {})})
                if listener := self._listeners.get(job_id):
                    listener(own_progress(progress, decoded, offset, count))
            offset += count
        return StepCheck(cancel_requested=cancelled, lost=frozenset())

    def ended(self, job: Job, images: tuple[bytes, ...] = ()) -> None:
        self._listeners.pop(job.id, None)
        self._cancel_requested.discard(job.id)
        self.hub.publish(job.id, end_event(job))
        # Last: the woken caller's answer then need not wait for this thread's Python work (the GIL).
        if (ended := self._waiters.pop(job.id, None)) is not None:
            settle(ended, Outcome(job, images))
