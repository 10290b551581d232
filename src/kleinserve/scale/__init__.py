"""The scaled-out processes (this package: `Scale`, the shared state's address; api.py, worker.py,
housekeeping.py), on PostgreSQL (jobs, keys, usage, webhook outbox) and S3-compatible storage
(media).

    kleinserve api --database-url postgresql://... --media-url s3://bucket/prefix --port 8000   # no weights
    kleinserve worker --database-url postgresql://... --media-url s3://bucket/prefix --model DIR

API processes are stateless: any number run behind a load balancer, each answering for every job. Worker
processes (one per GPU) each load one engine and claim batches of its model (jobs/loop.py) under leases. Every
process runs a `Housekeeper`; the one holding its advisory lock re-queues jobs whose lease ran out (a worker
died: at most MAX_ATTEMPTS runs); one API process at a time (a lock of its own) delivers webhooks from the
outbox and deletes expired media. `kleinserve serve` (one box: SQLite, local files, the engine
in-process) is unchanged by any of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kleinserve.jobs.events import EventHub
from kleinserve.jobs.pg_coordination import PostgresCoordination
from kleinserve.jobs.store import LEASE_S, JobStore
from kleinserve.media import MediaStore, media_secret_from_env
from kleinserve.objects import open_objects


@dataclass(frozen=True)
class Scale:
    """Where the shared state is: the database, the media (`s3://bucket/prefix`, or None: `data_dir`, one
    machine only) and the leases' length."""

    database_url: str
    media_url: str | None
    data_dir: Path
    lease_s: float = LEASE_S


def media_store(scale: Scale, store: JobStore, ttl_s: int) -> MediaStore:
    """The shared media: links signed with KLEINSERVE_MEDIA_SECRET, else a secret the database keeps, so that
    every API process verifies every other's links."""
    secret = media_secret_from_env() or store.shared_secret("media-links")
    return MediaStore(open_objects(scale.media_url, scale.data_dir), secret, ttl_s)


def coordination_for(scale: Scale, store: JobStore, media: MediaStore, hub: EventHub) -> PostgresCoordination:
    return PostgresCoordination(
        scale.database_url, store, media.objects, hub, media.read, lease_s=scale.lease_s
    )
