"""Housekeeping of a scaled-out fleet: leases that ran out (one leader, any process, with the others as its
fallback), the webhook outbox and expired media (every API process; the outbox's claims keep each webhook to
one sender)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kleinserve.errors import StoreUnavailable
from kleinserve.jobs.batch import result_group
from kleinserve.jobs.coordination import Coordination
from kleinserve.jobs.pg_coordination import PREVIEW_KEEP_S, Leadership
from kleinserve.jobs.store import JobStore
from kleinserve.jobs.webhooks import WebhookSender
from kleinserve.jobs.writes import EngineWrites
from kleinserve.media import MediaStore, ReferenceStore
from kleinserve.scale import Scale

log = logging.getLogger(__name__)
HOUSEKEEPING_S = 1.0  # how often the housekeeper looks (expired leases, the outbox, the store's health)
MEDIA_CLEANUP_TICKS = 60  # expired media are looked for every minute
WEBHOOK_CLAIM_S = 300.0  # an outbox claim outlives a delivery's retries (1 + 5 + 30 s, 30 s per attempt)
LEADER_GRACE_LEASES = 2  # how many leases past expiry a non-leader steps in for the housekeeping leader


class Housekeeper:
    """The fleet's periodic duties. The process holding the advisory lock re-queues (or fails) jobs as soon as
    their lease runs out. The others do it only for leases that ran out more than LEADER_GRACE_LEASES leases
    ago: a leader that is frozen (SIGSTOP, a stalled VM) keeps its lock, because its connection stays open,
    and must not stall recovery for good (tests/scale/test_multiprocess.py's stale worker led it when it was
    frozen). The store skips rows another process is handling, so two processes never act on one job.
    Every process also does `duties` of its own (the API's outbox and media) and, with `writes` (an API
    process), checks after a refused write whether the store takes writes again (its readiness); a worker's
    engine loop does that itself."""

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
        self.grace_s = LEADER_GRACE_LEASES * scale.lease_s
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
        self.duties()
        now = time.time()
        expired_before = now if self.leadership.held() else now - self.grace_s
        for job in self.store.requeue_expired(expired_before):  # rows as changed, with the lost run's fence
            log.warning("job %s lost its worker: now %s", job.id, job.status.value)
            # What the lost run saved but never committed (a worker killed while uploading); its step
            # previews go with every other job's, in the media sweep (remove_expired_media).
            self.media.remove_group(result_group(job))
            if job.status.terminal:  # its webhook goes through the outbox
                self.references.remove(job.id, job.reference_count)
                self.coordination.ended(job)


class Outbox:
    """The API tier's share of housekeeping, done by every API process (workers send no webhooks): webhooks of
    ended jobs, each claimed by one process (SKIP LOCKED; an unsent one is claimed again after
    WEBHOOK_CLAIM_S), and expired media and previews (deleting twice is harmless)."""

    def __init__(self, store: JobStore, webhooks: WebhookSender, media: MediaStore, holder: str) -> None:
        self.store = store
        self.webhooks = webhooks
        self.media = media
        self.holder = holder
        self._ticks = 0

    def tick(self) -> None:
        for job in self.store.claim_webhooks(self.holder, 32, WEBHOOK_CLAIM_S):
            self.webhooks.schedule(job)
        self._ticks += 1
        if self._ticks % MEDIA_CLEANUP_TICKS == 0 and (removed := remove_expired_media(self.media)):
            log.info("removed %d expired media objects", removed)


def remove_expired_media(media: MediaStore, now: float | None = None) -> int:
    """Delete result images past their links' lifetime and step previews older than PREVIEW_KEEP_S (the
    workers leave theirs: an API process may read a step's preview after the job ended); returns how many."""
    now = time.time() if now is None else now
    return media.remove_expired(now) + media.objects.delete_older_than("previews/", now - PREVIEW_KEEP_S)
