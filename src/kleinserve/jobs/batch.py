"""One batch's work around the engine call: at each denoising step (`BatchSteps`, the worker's step callback,
on the engine thread) and once its images are made (`store_result`, on an encoder thread).

At each step, jobs whose cancel was asked end, progress is saved at most every `progress_interval_s`, every
live job gets its step event (with a preview for subscribers that want one) and its in-process listener its
own images' preview. The batch stops when no job in it is live (`cancelled`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from kleinserve.jobs import metering
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.metrics import Metrics
from kleinserve.jobs.record import JobResult
from kleinserve.jobs.store import Job, JobStatus
from kleinserve.jobs.writes import EngineWrites
from kleinserve.types import GenerateResult, ImageFormat, Progress, StepCallback, encode_image

log = logging.getLogger(__name__)


class OutputStore(Protocol):
    """Where result images go (kleinserve.media.MediaStore)."""

    def save(self, data: bytes, fmt: ImageFormat) -> str: ...


class BatchSteps:
    """The step callback of one batch (`batch` in the engine's image order). `cancel_requested` and
    `listeners` are the worker's, read at every step; `end` receives the final row of a job cancelled here."""

    def __init__(
        self,
        batch: list[Job],
        *,
        hub: EventHub,
        writes: EngineWrites,
        metrics: Metrics,
        listeners: Mapping[str, StepCallback],
        cancel_requested: set[str],
        end: Callable[[Job], None],
        progress_interval_s: float,
    ) -> None:
        self.by_id = {job.id: job for job in batch}
        self.live = set(self.by_id)  # jobs not cancelled: their images are still wanted
        self.counts = [(job.id, job.params.num_images) for job in batch]
        self.images = sum(count for _, count in self.counts)
        self.hub = hub
        self.writes = writes
        self.metrics = metrics
        self.listeners = listeners
        self.cancel_requested = cancel_requested
        self.end = end
        self.progress_interval_s = progress_interval_s
        self.last_saved = time.perf_counter()  # when progress was last written to the store

    def cancelled(self) -> bool:
        """Every job of the batch was cancelled: the engine stops it."""
        return not self.live

    def __call__(self, progress: Progress) -> None:
        self.metrics.step.observe(progress.seconds)
        now = time.perf_counter()
        done = progress.step / progress.total_steps
        for job_id in list(self.live & self.cancel_requested):
            self.live.discard(job_id)
            job = self.by_id[job_id]
            self.end(
                self.writes.finish(job, JobStatus.CANCELLED, error="cancelled by the client", progress=done)
            )
        save_progress = now - self.last_saved >= self.progress_interval_s
        if save_progress:
            self.last_saved = now
        decoded = functools.cache(progress.preview)  # one VAE pass per step, whoever asks
        previews = self.hub.previews(decoded, self.counts, self.live)
        offset = 0
        for job_id, count in self.counts:
            if job_id in self.live:
                if save_progress:
                    self.writes.progress(job_id, done)
                event = {"type": "step", "step": progress.step, "total_steps": progress.total_steps}
                self.hub.publish(job_id, {**event, **previews.get(job_id, {})})
                if listener := self.listeners.get(job_id):
                    own = functools.partial(lambda o, c: decoded()[o : o + c], offset, count)
                    listener(replace(progress, preview=own))
            offset += count


def store_result(
    job: Job, result: GenerateResult, *, outputs: OutputStore, writes: EngineWrites, metrics: Metrics
) -> tuple[Job, tuple[bytes, ...]]:
    """Encode a succeeded job's images in its format, save them and store its end; returns the final row and
    the encoded bytes. A failure to encode or save (a full disk) fails the job with the reason instead."""
    try:
        fmt = job.params.output_format
        media_names, encoded = [], []
        for image in result.images:
            start = time.perf_counter()
            data = encode_image(image.image, fmt, job.params.output_quality)
            metrics.image_encoding.observe(time.perf_counter() - start)
            media_names.append(outputs.save(data, fmt))
            encoded.append(data)
    except Exception as exc:  # a full disk (OSError) is not a bug, anything else is
        if not isinstance(exc, OSError):
            log.exception("storing the result of job %s failed", job.id)
        error = "storing the result failed" + (f" ({exc.strerror})" if isinstance(exc, OSError) else "")
        return writes.finish(job, JobStatus.FAILED, error=error), ()
    summary = JobResult.from_result(result, media_names)
    usage = metering.usage(result, engine_seconds=sum(result.timings.values()))
    return writes.finish(job, JobStatus.SUCCEEDED, result=summary, usage=usage), tuple(encoded)
