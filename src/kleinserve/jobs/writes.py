"""The engine's writes to the job store, made to survive a store that refuses them for a while.

Another process holding SQLite's write lock past the busy timeout, or a full disk, makes a write raise
StoreUnavailable. The engine must not die of it (it did: jobs then stayed queued forever and synchronous
callers waited forever). So, while writes are refused:
- a job's final row is kept in memory, in order, and written by the engine loop once the store takes writes
  again (`catch_up`, every STORE_RETRY_S); the job's caller, events and webhook get the row at once;
- progress is not saved (it is informative; the next save after recovery brings it up to date);
- `refusal` says why, and the worker is not ready (/readyz answers 503).
Guarded by tests/jobs/test_store_failures.py.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kleinserve.errors import StoreUnavailable
from kleinserve.jobs.store import Job, JobStatus, JobStore, LeaseLost

log = logging.getLogger(__name__)


class EngineWrites:
    """The worker's job-store writes (its engine and encoder threads); `on_deferred` wakes the engine loop,
    which calls `catch_up`."""

    def __init__(self, store: JobStore, on_deferred: Callable[[], None]) -> None:
        self.store = store
        self.on_deferred = on_deferred
        self.refusal: str | None = None  # why the last write failed, until the store takes writes again
        # Final rows not yet written, oldest first: (job id, status, fields), appended from any thread.
        self._deferred: collections.deque[tuple[str, JobStatus, dict[str, Any]]] = collections.deque()

    def refused(self, exc: StoreUnavailable) -> None:
        if self.refusal is None:
            log.error("the job store refuses writes; not ready until it takes them again: %s", exc.message)
        self.refusal = exc.message

    def finish(self, job: Job, status: JobStatus, **fields: Any) -> Job:
        """Store a job's end (`fields`: error, result, usage, progress, and `fence`: the claim it ran under);
        returns its final row, as stored or, while the store refuses writes, as it will be stored by
        `catch_up`. LeaseLost (from the store) when the claim is no longer this worker's."""
        if self.refusal is None:
            try:
                return self.store.finish(job.id, status, **fields)
            except StoreUnavailable as exc:
                self.refused(exc)
        fields = {**fields, "finished": time.time()}  # the time it ended, not the time it is written
        if status is JobStatus.SUCCEEDED:
            fields["progress"] = 1.0
        self._deferred.append((job.id, status, fields))
        self.on_deferred()
        return replace(job, status=status, **fields)

    def progress(self, job_id: str, progress: float) -> None:
        """Save a running job's progress (0-1), unless the store refuses writes; never raises."""
        if self.refusal is None:
            try:
                self.store.set_progress(job_id, progress)
            except StoreUnavailable as exc:
                self.refused(exc)

    def catch_up(self) -> None:
        """Write the deferred final rows, oldest first; then, if writes were refused, check that the store
        takes them again. Raises StoreUnavailable while it does not (the rows not written stay deferred)."""
        while self._deferred:
            job_id, status, fields = self._deferred[0]
            try:
                self.store.finish(job_id, status, **fields)
            except LeaseLost:  # its lease ran out meanwhile and another worker took the job over
                log.warning("job %s was taken over while its end waited to be written: discarded", job_id)
            self._deferred.popleft()
        if self.refusal is not None:
            self.store.check_writable()
            self.refusal = None
            log.warning("the job store takes writes again: ready")
