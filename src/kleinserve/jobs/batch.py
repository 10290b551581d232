"""One batch's work around the engine call: at each denoising step (`BatchSteps`, the worker's step callback,
on the engine thread) and once its images are made (`store_result`, on an encoder thread).

At each step, progress is saved at most every `progress_interval_s`, every live job gets its step event (with
a preview for subscribers that want one) and its listener its own images' preview (jobs/coordination.py), and
jobs whose cancel was asked end. The batch stops when no job in it is live (`cancelled`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from kleinserve.errors import StoreUnavailable
from kleinserve.jobs import metering
from kleinserve.jobs.coordination import BatchProgress, Coordination
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.record import JobResult
from kleinserve.jobs.store import Job, JobStatus, LeaseLost
from kleinserve.jobs.writes import EngineWrites
from kleinserve.types import GenerateResult, ImageFormat, Progress, encode_image

log = logging.getLogger(__name__)


class OutputStore(Protocol):
    """Where result images go (kleinserve.media.MediaStore)."""

    def save(self, data: bytes, fmt: ImageFormat, group: str = "") -> str:
        """Store an encoded image; its name, which starts with `group`."""
        ...

    def remove(self, name: str) -> None:
        """Delete a stored image (gone already is fine)."""
        ...


class BatchSteps:
    """The step callback of one claimed batch (`batch` in the engine's image order, one fence). Each step goes
    through `coordination.step` (events, previews, listeners, the claim kept); `end` receives the final row of
    a job cancelled here."""

    def __init__(
        self,
        batch: list[Job],
        *,
        coordination: Coordination,
        writes: EngineWrites,
        metrics: Metrics,
        end: Callable[[Job], None],
        progress_interval_s: float,
    ) -> None:
        self.by_id = {job.id: job for job in batch}
        self.live = set(self.by_id)  # jobs not cancelled or lost: their images are still wanted
        self.progress = BatchProgress(
            [(job.id, job.params.num_images) for job in batch], self.live, fence=batch[0].fence
        )
        self.images = sum(count for _, count in self.progress.counts)
        self.coordination = coordination
        self.writes = writes
        self.metrics = metrics
        self.end = end
        self.progress_interval_s = progress_interval_s
        self.last_saved = time.perf_counter()  # when progress was last written to the store

    def cancelled(self) -> bool:
        """Every job of the batch was cancelled (or taken over): the engine stops it."""
        return not self.live

    def finish(self, job: Job, status: JobStatus, **fields: Any) -> None:
        """Store the end of a live job of this batch under its claim, and end it; a job whose claim was lost
        (another worker holds it now) is only dropped."""
        self.live.discard(job.id)
        try:
            final = self.writes.finish(job, status, fence=job.fence, **fields)
        except LeaseLost:
            log.warning("job %s was taken over by another worker: this run's end is discarded", job.id)
            return
        self.end(final)

    def __call__(self, progress: Progress) -> None:
        self.metrics.step.observe(progress.seconds)
        now = time.perf_counter()
        self.progress.done = progress.step / progress.total_steps
        self.progress.save_progress = now - self.last_saved >= self.progress_interval_s
        if self.progress.save_progress:
            self.last_saved = now
        check = self.coordination.step(self.progress, progress)
        for job_id in check.lost & self.live:
            log.warning("job %s was taken over by another worker: this run stops", job_id)
            self.live.discard(job_id)
        for job_id in check.cancel_requested & self.live:
            self.finish(
                self.by_id[job_id],
                JobStatus.CANCELLED,
                error="cancelled by the client",
                progress=self.progress.done,
            )


def store_result(
    job: Job, result: GenerateResult, *, outputs: OutputStore, writes: EngineWrites, metrics: Metrics
) -> tuple[Job, tuple[bytes, ...]]:
    """Encode a succeeded job's images in its format, save them and store its end under the job's claim
    (`job.fence`); returns the final row and the encoded bytes. A failure to encode or save (a full disk, the
    object store down) fails the job with the reason instead. LeaseLost when the claim was taken over: the
    images saved are removed again, so a stale worker leaves no orphaned media."""
    media_names: list[str] = []
    try:
        fmt = job.params.output_format
        encoded = []
        for image in result.images:
            start = time.perf_counter()
            data = encode_image(image.image, fmt, job.params.output_quality)
            metrics.image_encoding.observe(time.perf_counter() - start)
            media_names.append(outputs.save(data, fmt, result_group(job)))
            encoded.append(data)
    except Exception as exc:  # a full disk (OSError) or an unreachable object store are not bugs
        reason = None
        if isinstance(exc, OSError):
            reason = exc.strerror
        elif isinstance(exc, StoreUnavailable):
            reason = exc.message
        else:
            log.exception("storing the result of job %s failed", job.id)
        error = "storing the result failed" + (f" ({reason})" if reason else "")
        _remove(outputs, media_names)
        return writes.finish(job, JobStatus.FAILED, fence=job.fence, error=error), ()
    summary = JobResult.from_result(result, media_names)
    usage = metering.usage(
        result, engine_seconds=sum(result.timings.values()), adapters=len(job.params.loras)
    )
    try:
        final = writes.finish(job, JobStatus.SUCCEEDED, fence=job.fence, result=summary, usage=usage)
    except LeaseLost:
        _remove(outputs, media_names)
        raise
    return final, tuple(encoded)


def result_group(job: Job) -> str:
    """The start of the names of the images one run of `job` saves (its id, hashed so that a result link
    does not give the job's id away, and its claim's fence): a run that died between saving and committing
    leaves images the housekeeper finds by this and removes (scale/housekeeping.py), while a rerun's are left
    alone."""
    return f"{hashlib.sha256(job.id.encode()).hexdigest()[:16]}-{job.fence}-"


def _remove(outputs: OutputStore, names: list[str]) -> None:
    for name in names:
        try:
            outputs.remove(name)
        except (OSError, StoreUnavailable) as exc:  # left for the media clean-up (its lifetime)
            log.warning("could not remove result image %s: %s", name, exc)
