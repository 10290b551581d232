"""Webhook delivery: on completion, POST the job's outcome to the URL the client gave, signed.

Signature: `X-BFL-Signature: sha256=<hex HMAC-SHA256 of the raw body with the job's webhook_secret>`.
Delivery is retried after 1, 5 and 30 s; the target must be a public address unless private URLs are
allowed (the same rule as reference URLs); the outcome is kept on the job (`webhook_status`). The body is
built by the API dialect that accepted the webhook (BFL), so this module knows no wire format.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

import httpx

from kleinserve.errors import InvalidInput
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.store import Job, JobStore
from kleinserve.media import check_public_url
from kleinserve.types import json_bytes

log = logging.getLogger(__name__)
RETRY_DELAYS_S = (1.0, 5.0, 30.0)
WEBHOOK_TIMEOUT_S = 30.0


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(
        self,
        client: httpx.AsyncClient,
        store: JobStore,
        hub: EventHub,
        render: Callable[[Job], dict[str, Any]],
        allow_private: bool = False,
    ) -> None:
        self.client = client
        self.store = store
        self.hub = hub  # its event loop runs the deliveries
        self.render = render
        self.allow_private = allow_private

    def schedule(self, job: Job) -> None:
        """Deliver in the background (callable from any thread) if the job has a webhook."""
        if job.webhook_url and self.hub.loop is not None:
            asyncio.run_coroutine_threadsafe(self.deliver(job), self.hub.loop)

    async def deliver(self, job: Job) -> str:
        """Send with retries; returns and stores the outcome."""
        assert job.webhook_url is not None
        body = json_bytes(self.render(job))
        headers = {"Content-Type": "application/json"}
        if job.webhook_secret:
            headers["X-BFL-Signature"] = signature(body, job.webhook_secret)
        outcome = ""
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S), start=1):  # read here: tests shorten them
            await asyncio.sleep(delay)
            try:
                # Resolving blocks: on a worker thread, never on the event loop.
                await asyncio.to_thread(check_public_url, job.webhook_url, "webhook_url", self.allow_private)
                response = await self.client.post(
                    job.webhook_url, content=body, headers=headers, timeout=WEBHOOK_TIMEOUT_S
                )
            except InvalidInput as exc:
                outcome = f"refused: {exc.message}"
                break
            except httpx.HTTPError as exc:
                outcome = f"attempt {attempt}: {type(exc).__name__}"
                continue
            if response.is_success:
                outcome = f"delivered on attempt {attempt} (HTTP {response.status_code})"
                break
            outcome = f"attempt {attempt}: HTTP {response.status_code}"
        else:
            outcome = f"failed after {attempt} attempts ({outcome})"
        self.store.set_webhook_status(job.id, outcome)
        log.info("webhook of job %s: %s", job.id, outcome)
        return outcome
