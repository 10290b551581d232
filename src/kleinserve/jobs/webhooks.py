"""Webhook delivery: on completion, POST the job's outcome to the URL the client gave, signed.

This module knows no wire format. The API dialect that accepts a webhook registers a `WebhookFormat` (the body
of a finished job, the headers that sign it) under a name, and records that name on the job
(`extra[FORMAT_KEY]`); a job that records none (stored before formats were recorded) is sent in the sender's
default format. Delivery is retried after 1, 5 and 30 s; the target must be a public address unless private
URLs are allowed (the same policy as reference URLs, resolved once and pinned: outbound.py); the final outcome
is kept on the job (`webhook_status`).

Each attempt has WEBHOOK_TIMEOUT_S in all, from resolving the host to the answer's status (receivers are asked
to answer 2xx within 30 s), on a connection pool of the sender's own (hanging receivers cannot take the
reference fetcher's connections) of WEBHOOK_CONNECTIONS, which is also how many attempts run at once (others
wait for a turn before their deadline starts). The answer is its status: at most WEBHOOK_READ_BYTES of the
body are read, within the same deadline, only so that a short answer leaves the connection reusable.

Durable: a delivery is pending while its job is finished, has a webhook_url and has no webhook_status (written
once, with the final outcome). At start-up, after crash recovery (so that the jobs it failed are included),
`resume()` starts every pending delivery: one cut by a crash or a shutdown is sent again from its first
attempt. A receiver may so see a delivery twice (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import httpx

from kleinserve.errors import InvalidInput, KleinError
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.store import Job, JobStore
from kleinserve.outbound import OutboundClient, OutboundPolicy
from kleinserve.types import json_bytes

log = logging.getLogger(__name__)
RETRY_DELAYS_S = (1.0, 5.0, 30.0)
WEBHOOK_TIMEOUT_S = 30.0  # per attempt, all of it
WEBHOOK_READ_BYTES = 4096  # of an answer's body; past that the connection is closed
WEBHOOK_CONNECTIONS = 16  # the sender's pool, and attempts at once
# The key of Job.extra naming the job's WebhookFormat; the dialect that accepted the job chose the name.
FORMAT_KEY = "webhook_format"


@dataclass(frozen=True)
class WebhookFormat:
    """How one dialect's webhooks look. `render(job)` is the JSON body for a finished job (called once per
    delivery, so every retry sends the same bytes); `sign(body, secret)` the headers that sign the raw body
    with the job's webhook_secret (called only when the job has one)."""

    render: Callable[[Job], dict[str, Any]]
    sign: Callable[[bytes, str], dict[str, str]]


class WebhookSender:
    """Delivers finished jobs' webhooks on the hub's event loop. Lifecycle: `schedule()` from the worker as
    jobs end, `resume()` once at start-up, `aclose()` at shutdown."""

    def __init__(
        self,
        policy: OutboundPolicy,
        store: JobStore,
        hub: EventHub,
        formats: Mapping[str, WebhookFormat],
        default: WebhookFormat,
        resumes: bool = True,
    ) -> None:
        """`formats` by the names jobs record under FORMAT_KEY; `default` for jobs that record none. Without
        `resumes` (scaled out: an outbox hands every delivery to `schedule`, once per fleet) there is no
        `resume()` to keep deliveries apart from."""
        self.client = OutboundClient(policy, max_connections=WEBHOOK_CONNECTIONS)
        self.store = store
        self.hub = hub  # its event loop runs the deliveries
        self.formats = formats
        self.default = default
        self._turns = asyncio.Semaphore(WEBHOOK_CONNECTIONS)
        self._tasks: set[asyncio.Task[str]] = set()
        # Each finished job is delivered once by this process, whether resume() or schedule() sees it first:
        # the ids schedule() started before resume() looked, and those resume() started.
        self._started_before_resume: set[str] | None = set() if resumes else None
        self._resumed: frozenset[str] = frozenset()
        self._closed = False

    def schedule(self, job: Job) -> None:
        """Deliver in the background if the job has a webhook; callable from any thread. Without a running
        loop (not started yet, or shut down) the delivery stays pending for the next start."""
        loop = self.hub.loop
        if job.webhook_url and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._on_finished, job)

    def _on_finished(self, job: Job) -> None:
        if self._closed or job.id in self._resumed:
            return
        if self._started_before_resume is not None:
            self._started_before_resume.add(job.id)
        self._start(job)

    async def resume(self) -> int:
        """Start the deliveries the store has pending (cut by a crash or a shutdown, or of jobs that crash
        recovery failed); call once, after the worker's recovery. Returns how many were started."""
        try:
            pending = await asyncio.to_thread(self.store.pending_webhooks)
        except KleinError as exc:  # the store cannot be read now: they stay pending for the next start
            log.warning("pending webhook deliveries not resumed (%s)", exc.message)
            pending = []
        started = self._started_before_resume or set()
        self._started_before_resume = None
        self._resumed = frozenset(job.id for job in pending if job.id not in started)
        for job in pending:
            if job.id in self._resumed and not self._closed:
                self._start(job)
        if self._resumed:
            log.info("resuming %d pending webhook deliveries", len(self._resumed))
        return len(self._resumed)

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self.deliver(job))
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[str]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:  # a bug: still pending in store
            log.error("webhook delivery failed", exc_info=error)

    async def aclose(self) -> None:
        """Stop: deliveries in flight are cancelled (they stay pending: the next start resumes them), then
        the connections are closed."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()

    async def deliver(self, job: Job) -> str:
        """Send with retries in the job's format; returns and stores the final outcome."""
        assert job.webhook_url is not None
        name = job.extra.get(FORMAT_KEY)
        webhook_format = self.default if name is None else self.formats.get(name)
        if webhook_format is None:  # recorded by a server that registered other formats: none fits
            outcome = f"refused: no webhook format {name!r} is registered"
        else:
            body = json_bytes(webhook_format.render(job))
            headers = {"Content-Type": "application/json"}
            if job.webhook_secret:
                headers.update(webhook_format.sign(body, job.webhook_secret))
            outcome = await self._send(job.webhook_url, body, headers)
        log.info("webhook of job %s: %s", job.id, outcome)
        try:
            await asyncio.to_thread(self.store.set_webhook_status, job.id, outcome)
        except KleinError as exc:  # the store refused the write: still pending, sent again at the next start
            log.warning("webhook of job %s: the outcome was not stored (%s)", job.id, exc.message)
        return outcome

    async def _send(self, url: str, body: bytes, headers: Mapping[str, str]) -> str:
        """POST until a 2xx, a refused target or the last retry; returns the outcome in words."""
        outcome = ""
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S), start=1):  # read here: tests shorten them
            await asyncio.sleep(delay)
            try:
                status = await self._attempt(url, body, headers)
            except InvalidInput as exc:
                return f"refused: {exc.message}"
            except TimeoutError:
                outcome = f"attempt {attempt}: no answer within {WEBHOOK_TIMEOUT_S:g} s"
                continue
            except httpx.HTTPError as exc:
                outcome = f"attempt {attempt}: {type(exc).__name__}"
                continue
            if 200 <= status < 300:
                return f"delivered on attempt {attempt} (HTTP {status})"
            outcome = f"attempt {attempt}: HTTP {status}"
        return f"failed after {attempt} attempts ({outcome})"

    async def _attempt(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        """One POST; returns the answer's status. TimeoutError past WEBHOOK_TIMEOUT_S without a status."""
        status: int | None = None
        async with self._turns:
            try:
                async with asyncio.timeout(WEBHOOK_TIMEOUT_S):
                    async with self.client.stream(
                        "POST", url, "webhook_url", timeout=WEBHOOK_TIMEOUT_S, content=body, headers=headers
                    ) as response:
                        status = response.status_code
                        await _read_some(response, WEBHOOK_READ_BYTES)
            except (TimeoutError, httpx.HTTPError):
                if status is None:
                    raise
                # The answer was given; its body is not ours to wait for (leaving closes the connection).
        assert status is not None  # or the attempt raised
        return status


async def _read_some(response: httpx.Response, limit: int) -> None:
    """Read the body until it ends or `limit` bytes are in (one network read may bring up to 64 KiB)."""
    received = 0
    # aiter_raw is typed as an AsyncIterator; it is an async generator, which aclosing finalises at once.
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    async with contextlib.aclosing(raw) as chunks:
        async for chunk in chunks:
            received += len(chunk)
            if received >= limit:
                return
