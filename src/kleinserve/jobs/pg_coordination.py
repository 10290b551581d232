"""Coordination across processes on one PostgreSQL database: API processes accept jobs, worker processes run
them.

Channels (NOTIFY payloads are JSON, well under PostgreSQL's 8000-byte limit):
- `kleinserve_queued` (API -> workers): a job was queued for a model; idle workers claim at once rather
  than at their next poll (IDLE_POLL_S).
- `kleinserve_events` (workers, and APIs cancelling queued jobs -> APIs): `{"jobs": [ids], "event": {...},
  "previews": [ids]}`; one notify per batch step for the whole batch (a notifying commit takes a global lock:
  scale-out.md §2), plus `running` per batch and one per job end.
- `kleinserve_watch` (APIs -> workers): `{"jobs": [ids]}` whose previews someone here wants (an SSE subscriber
  with previews, or a streaming caller's step listener), renewed every WATCH_RENEW_S while wanted. A streaming
  caller's job also says so in its row (Job.extra[WANTS_PREVIEWS]): its first steps need not wait for the
  watch. A worker writes those jobs' preview images to the object store (`previews/<job>-<step>-<i>.png`) at
  each step and leaves them: a step's notify may be read after the job's next steps, or its end (a 4-step
  job ends in milliseconds), and its previews must still be there. The API tier's media sweep
  (scale.housekeeping) deletes those older than PREVIEW_KEEP_S.

NOTIFY is best-effort (lost while a listener reconnects), so the rows are the truth: the accepting side polls
the rows of the jobs it waits for or streams every POLL_S and settles those that ended; the running side
learns of a cancel from `JobStore.extend`'s answer at every step (the same statement keeps its lease and saves
progress), and a heartbeat thread keeps the lease between steps (text encoding, result upload).
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson
import psycopg
from PIL import Image

from kleinserve.errors import KleinError, StoreUnavailable
from kleinserve.jobs.coordination import (
    WANTS_PREVIEWS,
    BatchProgress,
    Followers,
    Outcome,
    end_event,
    own_progress,
    settle,
    step_event,
)
from kleinserve.jobs.events import PREVIEW_SIDE, TERMINAL_EVENTS, EventHub
from kleinserve.jobs.store import LEASE_S, Job, JobStatus, JobStore, StepCheck
from kleinserve.types import Progress, StepCallback, base64_text, encode_image

log = logging.getLogger(__name__)
QUEUED, EVENTS, WATCH = "kleinserve_queued", "kleinserve_events", "kleinserve_watch"
POLL_S = 1.0  # the accepting side's look at the rows of followed jobs (NOTIFY may be lost)
WATCH_RENEW_S = 1.0  # how often wanted previews are re-announced; a worker forgets a watch after WATCH_TTL_S
WATCH_TTL_S = 5.0
PREVIEW_KEEP_S = 10.0  # a stored preview is kept at least this long for the API processes to read
RECONNECT_S = 1.0


class Blobs(Protocol):
    """The object store's part used here (kleinserve.objects.ObjectStore)."""

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str) -> list[str]: ...


def preview_key(job_id: str, step: int, index: int) -> str:
    return f"previews/{job_id}-{step}-{index}.png"


class PostgresCoordination(Followers):
    """Both sides' coordination through `url`'s database; one process uses the accepting side (`kleinserve
    api`) or the running side (`kleinserve worker`). `read_result(name)` reads a result image's bytes (for
    synchronous callers); `wake` is called when a job was queued (a worker's engine loop)."""

    def __init__(
        self,
        url: str,
        store: JobStore,
        blobs: Blobs,
        hub: EventHub,
        read_result: Callable[[str], bytes],
        *,
        lease_s: float = LEASE_S,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        self.store = store
        self.blobs = blobs
        self.hub = hub
        self.read_result = read_result
        self.lease_s = lease_s
        self.wake = wake
        super().__init__()
        self._watched: dict[str, float] = {}  # running side: job id -> when its watch expires
        # running side: job id -> the fence of the claim this process runs it under
        self._held: dict[str, int] = {}
        self._send_lock = threading.Lock()
        self._sender: psycopg.Connection[Any] | None = None
        self._stopping = threading.Event()
        # A subscriber wants previews: announce it at once rather than at the next round.
        self._watch_now = threading.Event()
        hub.on_preview_watch = lambda job_id: self._watch_now.set()
        self._threads: list[threading.Thread] = []

    # lifecycle
    def start(self, accepting: bool) -> None:
        """Listen (the accepting side to events, the running side to queued jobs and watches) on a thread of
        its own; the running side also keeps its leases alive."""
        channels = [EVENTS] if accepting else [QUEUED, WATCH]
        self._spawn(self._listen, channels)
        self._spawn(self._poll if accepting else self._heartbeat)

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._sender is not None:
            self._sender.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(
            target=target, args=args, name=f"kleinserve-{target.__name__[1:]}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def notify(self, channel: str, payload: dict[str, Any]) -> None:
        """Send one notification; a database that cannot be reached loses it (the rows are polled)."""
        text = orjson.dumps(payload).decode()
        with self._send_lock:
            try:
                if self._sender is None or self._sender.closed:
                    self._sender = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                self._sender.execute("SELECT pg_notify(%s, %s)", (channel, text))
            except psycopg.Error as exc:
                log.info("notification on %s not sent (%s): the rows will tell", channel, exc)
                if self._sender is not None:
                    self._sender.close()
                self._sender = None

    # accepting side
    def follow(
        self, job_id: str, on_step: StepCallback | None, ended: asyncio.Future[Outcome] | None
    ) -> None:
        super().follow(job_id, on_step, ended)
        if on_step is not None:  # before the job is queued: previews from its first step
            self.notify(WATCH, {"jobs": [job_id]})

    def cancel_running(self, job_id: str) -> None:
        """Nothing to send: the worker reads the flag the store set in its next step's `extend`."""

    def queued(self, model: str) -> None:
        self.notify(QUEUED, {"model": model})

    def _listen(self, channels: list[str]) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
                    for channel in channels:
                        connection.execute(f"LISTEN {channel}")
                    while not self._stopping.is_set():
                        for note in connection.notifies(timeout=0.5):
                            self._received(note.channel, orjson.loads(note.payload))
            except psycopg.Error as exc:
                log.info("listening for notifications failed (%s); again in %g s", exc, RECONNECT_S)
                self._stopping.wait(RECONNECT_S)
            except Exception:  # a bug in a handler: logged, the listener goes on
                log.exception("handling a notification failed")

    def _received(self, channel: str, payload: dict[str, Any]) -> None:
        if channel == QUEUED:
            self.wake()
        elif channel == WATCH:
            until = time.monotonic() + WATCH_TTL_S
            self._watched.update(dict.fromkeys(payload["jobs"], until))
        else:
            self._deliver(payload["jobs"], payload["event"], payload.get("previews", {}))

    def _deliver(self, job_ids: Sequence[str], event: dict[str, Any], previews: dict[str, int]) -> None:
        """A worker's event for `job_ids`, to this process's subscribers, listeners and waiters; `previews`:
        the jobs whose preview images the worker stored, with their image counts."""
        terminal = event["type"] in TERMINAL_EVENTS
        for job_id in job_ids:
            images = self._previews(job_id, event["step"], previews[job_id]) if job_id in previews else []
            if images and self.hub.wants_previews(job_id):
                thumbnail = images[0].copy()
                thumbnail.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
                self.hub.publish(job_id, {**event, "preview": base64_text(encode_image(thumbnail))})
            else:
                self.hub.publish(job_id, event)
            if event["type"] == "step" and (listener := self._listeners.get(job_id)):
                progress = Progress(event["step"], event["total_steps"], 0.0)
                listener(own_progress(progress, images.copy, 0, len(images)))
            if terminal:
                self._settle(job_id)

    def _previews(self, job_id: str, step: int, count: int) -> list[Image.Image]:
        images = []
        try:
            for index in range(count):
                with Image.open(io.BytesIO(self.blobs.get(preview_key(job_id, step, index)))) as image:
                    images.append(image.copy())
        except KleinError as exc:  # gone or unreachable: this step goes without a preview
            log.info("preview of job %s not read: %s", job_id, exc.message)
        return images

    def _settle(self, job_id: str, job: Job | None = None) -> None:
        """Hand a waiting caller its job's end: the row (`job` when the caller has just read it), and a
        succeeded job's image bytes."""
        ended = self._waiters.get(job_id)
        self._listeners.pop(job_id, None)
        if ended is None:
            return
        job = job or self.store.get(job_id)
        if not job.status.terminal:
            return
        images: tuple[bytes, ...] = ()
        if job.status is JobStatus.SUCCEEDED and job.result is not None:
            images = tuple(self.read_result(image.media) for image in job.result.images)
        if self._waiters.pop(job_id, None) is not None:
            settle(ended, Outcome(job, images))

    def _poll(self) -> None:
        """The rows behind lost notifications, and the watches to renew. A job whose row has ended is settled
        here only POLL_S after this thread first saw it so: until then its end notify, behind its step
        notifies (whose previews the listener thread is still reading), settles it, and a streaming caller
        gets every step before its end (settling here first once cost a partial image)."""
        last_watch = 0.0
        seen_ended: dict[str, float] = {}  # job id -> when this thread first read its row as ended
        while not self._stopping.is_set():
            self._watch_now.wait(POLL_S / 2)
            now = time.monotonic()
            if self._watch_now.is_set() or now - last_watch >= WATCH_RENEW_S:
                self._watch_now.clear()
                last_watch = now
                self._renew_watches()
            followed = {*self._waiters, *self.hub.watched_jobs()}
            for job_id in followed:
                try:
                    job = self.store.get(job_id)
                except KleinError:  # down, or gone: look again next time
                    continue
                if job.status.terminal and now - seen_ended.setdefault(job_id, now) >= POLL_S:
                    self.hub.publish(job_id, end_event(job))
                    self._settle(job_id, job)  # the row just read: not read again
            for job_id in [job_id for job_id in seen_ended if job_id not in followed]:
                del seen_ended[job_id]

    def _renew_watches(self) -> None:
        wanted = [job_id for job_id in self.hub.watched_jobs() if self.hub.wants_previews(job_id)]
        wanted += list(self._listeners)
        for start in range(0, len(wanted), 100):  # 100 ids of 32 characters: a payload of ~3.5 KB
            self.notify(WATCH, {"jobs": wanted[start : start + 100]})

    # running side
    def started(self, batch: Sequence[Job]) -> None:
        self._held.update({job.id: job.fence for job in batch})
        # A streaming caller's job is watched from its first step: the API's watch, sent before the job was
        # queued, may still be on its way (a 4-step job once ended before it arrived: no partial images).
        until = time.monotonic() + WATCH_TTL_S
        for job in batch:
            if job.extra.get(WANTS_PREVIEWS):
                self._watched[job.id] = max(until, self._watched.get(job.id, 0.0))
        self.notify(EVENTS, {"jobs": [job.id for job in batch], "event": {"type": "running"}})

    def step(self, batch: BatchProgress, progress: Progress) -> StepCheck:
        live = sorted(batch.live)
        try:  # every step: the lease, the progress, the cancel flags, in one statement
            check = self.store.extend(live, batch.fence, self.lease_s, progress=batch.done)
        except StoreUnavailable as exc:  # the batch goes on; its end is written when the store is back
            log.warning("step not recorded: %s", exc.message)
            check = StepCheck(frozenset(), frozenset())
        self._release(check.lost)
        live = [job_id for job_id in live if job_id not in check.cancel_requested | check.lost]
        now = time.monotonic()
        watched = {job_id: count for job_id, count in batch.counts if self._watched.get(job_id, 0.0) > now}
        watched = {job_id: count for job_id, count in watched.items() if job_id in live}
        if watched:
            decoded = progress.preview()  # the whole batch's images, once
            offset = 0
            for job_id, count in batch.counts:
                if job_id in watched:
                    for index in range(count):
                        key = preview_key(job_id, progress.step, index)
                        self.blobs.put(key, encode_image(decoded[offset + index]))
                offset += count
        self.notify(EVENTS, {"jobs": live, "event": step_event(progress), "previews": watched})
        return check

    def ended(self, job: Job, images: tuple[bytes, ...] = ()) -> None:
        # Its previews stay (for the sweep): the last steps' notifies may not be read yet.
        self._held.pop(job.id, None)
        self._watched.pop(job.id, None)
        self.notify(EVENTS, {"jobs": [job.id], "event": end_event(job)})

    def _release(self, job_ids: frozenset[str]) -> None:
        """Stop keeping the leases of jobs this process no longer holds (taken over, or ended)."""
        for job_id in job_ids:
            self._held.pop(job_id, None)

    def _heartbeat(self) -> None:
        """Keep the leases of the jobs this process holds between steps (a third of the lease apart)."""
        while not self._stopping.wait(self.lease_s / 3):
            by_fence: dict[int, list[str]] = {}
            for job_id, fence in list(self._held.items()):
                by_fence.setdefault(fence, []).append(job_id)
            for fence, job_ids in by_fence.items():
                try:
                    self._release(self.store.extend(job_ids, fence, self.lease_s).lost)
                except StoreUnavailable as exc:
                    log.warning("leases not extended: %s", exc.message)
            now = time.monotonic()
            # a copy: the listener thread adds watches meanwhile
            expired = [job_id for job_id, until in list(self._watched.items()) if until < now]
            for job_id in expired:
                self._watched.pop(job_id, None)


class Leadership:
    """One leader among the processes of a database: a session-level advisory lock on a connection of its own,
    held for as long as that connection lives (a leader that dies or loses the database lets another take it
    at its next look)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name  # what is led: processes leading one name may differ from those leading another
        self._connection: psycopg.Connection[Any] | None = None
        self._held = False

    def held(self) -> bool:
        """Whether this process leads now; tries to take the lead when nobody holds it."""
        try:
            if self._connection is None or self._connection.closed:
                self._connection = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                self._held = False
            if self._held:
                self._connection.execute("SELECT 1")  # still connected: still held
            else:
                row = self._connection.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s))", (self.name,)
                ).fetchone()
                self._held = bool(row and row[0])
        except psycopg.Error:
            self.close()
        return self._held

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._held = False
