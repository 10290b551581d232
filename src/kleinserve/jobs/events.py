"""Progress fan-out: job events published on any thread, delivered to asyncio subscribers.

    hub = EventHub(); hub.attach(loop)
    async with hub.subscribe(job_id) as events:     # SSE endpoints: step events carry previews
        event = await events.get()
    async with hub.subscribe(job_id, previews=False) as events:   # progress without pictures
    hub.publish(job_id, {"type": "step", "step": 2, "total_steps": 4})   # engine or encoder thread
    hub.previews(decode, [(job_id, 1)], live={job_id})   # {job_id: {"preview": ...}} if anyone wants one

Event types: `queued` (with `position`), `running`, `step` (`step`, `total_steps`, optional `preview` base64
PNG), `succeeded`, `failed` (`error`), `cancelled`. The last three end the stream.

A preview costs a VAE decode and a PNG encode per step on the engine thread (as much as the denoising step
itself for small images), so previews are made only while a subscriber that wants them is listening.
Sync API callers do not subscribe at all: the worker hands them their job's end directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from PIL import Image

from kleinserve.types import base64_text, encode_image

TERMINAL_EVENTS = ("succeeded", "failed", "cancelled")
PREVIEW_SIDE = 256  # step previews are at most this many pixels per side
Event = dict[str, Any]


class EventHub:
    """Thread-safe publish, asyncio subscribe. Subscribers see events published after they subscribed."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # set by attach() when the server starts
        # Called (on the loop; must not block) when a subscriber that wants previews arrives: a process that
        # does not run the engine asks the one that does (jobs/pg_coordination.py).
        self.on_preview_watch: Callable[[str], None] = lambda job_id: None
        self._subscribers: defaultdict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
        self._preview_watchers: Counter[str] = Counter()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def publish(self, job_id: str, event: Event) -> None:
        """Deliver from any thread; never blocks. An event nobody is subscribed to is dropped here: waking
        the event loop for nothing costs the publishing thread a GIL hand-off per event (README, Performance).
        A subscriber that arrives later reads the job's state
        from the store after subscribing, as api/jobs.py does (tests/api/test_jobs_api.py, the events of a
        finished job; tests/jobs/test_events.py, an event before the first subscriber is dropped)."""
        if self.loop is None or job_id not in self._subscribers:  # read from any thread: a GIL-atomic lookup
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver, job_id, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def watched_jobs(self) -> list[str]:
        """The jobs someone is subscribed to now (from any thread: a copy of the keys)."""
        return list(self._subscribers.copy())

    def wants_previews(self, job_id: str) -> bool:
        """Someone subscribed with previews=True is listening to this job."""
        return self._preview_watchers[job_id] > 0

    def previews(
        self, decoded: Callable[[], list[Image.Image]], batch: list[tuple[str, int]], live: set[str]
    ) -> dict[str, Event]:
        """{"preview": base64 PNG of the job's first image} for the live jobs of a batch ((job id, image
        count) in batch order, as the images of `decoded()`) that a subscriber wants previews of. `decoded`
        costs a VAE pass for the whole batch: it is called only if someone watches."""
        watched = {job_id for job_id, _ in batch if job_id in live and self.wants_previews(job_id)}
        if not watched:
            return {}
        images = decoded()
        previews: dict[str, Event] = {}
        offset = 0
        for job_id, count in batch:
            if job_id in watched:
                first = images[offset].copy()
                first.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
                previews[job_id] = {"preview": base64_text(encode_image(first))}
            offset += count
        return previews

    def _deliver(self, job_id: str, event: Event) -> None:
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str, previews: bool = True) -> AsyncIterator[asyncio.Queue[Event]]:
        """The job's events from now on; with `previews`, step events carry a preview image."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        self._preview_watchers[job_id] += previews
        if previews:
            self.on_preview_watch(job_id)
        try:
            yield queue
        finally:
            self._subscribers[job_id].discard(queue)
            if not self._subscribers[job_id]:
                del self._subscribers[job_id]
            self._preview_watchers[job_id] -= previews
            if self._preview_watchers[job_id] <= 0:
                del self._preview_watchers[job_id]
