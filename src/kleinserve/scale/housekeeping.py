"""Housekeeping of a scaled-out fleet: leases that ran out (every process may lead it), the webhook outbox and
expired media (one API process leads it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kleinserve.errors import StoreUnavailable
from kleinserve.jobs.batch import result_group
from kleinserve.jobs.coordination import Coordination
from kleinserve.jobs.pg_coordination import Leadership, remove_previews
from kleinserve.jobs.store import JobStore
from kleinserve.jobs.webhooks import WebhookSender
from kleinserve.jobs.writes import EngineWrites
from kleinserve.media import MediaStore, ReferenceStore
from kleinserve.scale import Scale

log = logging.getLogger(__name__)
HOUSEKEEPING_S = 1.0  # how often the housekeeper looks (expired leases, the outbox, the store's health)
MEDIA_CLEANUP_TICKS = 60  # expired media are looked for every minute
WEBHOOK_CLAIM_S = 300.0  # an outbox claim outlives a delivery's retries (1 + 5 + 30 s, 30 s per attempt)


class Housekeeper:
    """The fleet's periodic duties: whichever process holds the advisory lock (others stand by) re-queues or
    fails jobs whose lease ran out; every process does `duties` of its own (the API's outbox and media). An
    API process also has `writes` checked: after a refused write, whether the store takes writes again (its
    readiness); a worker's engine loop does that itself."""

    def __init__(
        self,
        scale: Scale,
        store: JobStore,
        coordination: Coordination,
        media: MediaStore,
        references: ReferenceStore,
        writes: EngineWrites | None = None,
        duties: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.writes = writes
        self.coordination = coordination
        self.media = media
        self.references = references
        self.duties = duties
        self.leadership = Leadership(scale.database_url, "kleinserve-housekeeper")
        self.served: set[str] = set()  # models some live worker serves, as last read
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kleinserve-housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self.leadership.close()

    def _run(self) -> None:
        while not self._stopping.wait(HOUSEKEEPING_S):
            try:
                self.tick()
            except StoreUnavailable as exc:  # not ready (and intake answers 503 at once) until it is back
                if self.writes is not None:
                    self.writes.refused(exc)
            except Exception:  # a bug: logged; the next tick tries again
                log.exception("housekeeping failed")

    def tick(self) -> None:
        if self.writes is not None:
            self.writes.catch_up()  # raises StoreUnavailable while the store refuses writes
        self.served = self.store.served_models()
        self.duties()  # an API process's outbox, which has a leader of its own (a worker may lead here)
        if not self.leadership.held():
            return
        for job in self.store.requeue_expired():  # rows as changed, with the lost run's fence
            log.warning("job %s lost its worker: now %s", job.id, job.status.value)
            # What the lost run saved but never committed (a worker killed while uploading).
            self.media.remove_group(result_group(job))
            remove_previews(self.media.objects, job.id)
            if job.status.terminal:  # its webhook goes through the outbox
                self.references.remove(job.id, job.reference_count)
                self.coordination.ended(job)


class Outbox:
    """The API tier's share of housekeeping, done by one API process at a time (an advisory lock of its own:
    workers send no webhooks): webhooks of ended jobs, claimed so that each is sent once even across a change
    of leader (an unsent one is claimed again after WEBHOOK_CLAIM_S), and expired media and previews."""

    def __init__(
        self, scale: Scale, store: JobStore, webhooks: WebhookSender, media: MediaStore, holder: str
    ) -> None:
        self.store = store
        self.webhooks = webhooks
        self.media = media
        self.holder = holder
        self.leadership = Leadership(scale.database_url, "kleinserve-outbox")
        self._ticks = 0

    def tick(self) -> None:
        if not self.leadership.held():
            return
        for job in self.store.claim_webhooks(self.holder, 32, WEBHOOK_CLAIM_S):
            self.webhooks.schedule(job)
        self._ticks += 1
        if self._ticks % MEDIA_CLEANUP_TICKS == 0:
            removed = self.media.remove_expired()
            removed += self.media.objects.delete_older_than("previews/", time.time() - self.media.ttl_s)
            if removed:
                log.info("removed %d expired media objects", removed)

    def close(self) -> None:
        self.leadership.close()
