"""The housekeeper's lease recovery on a real PostgreSQL: the leader re-queues a job as soon as its lease runs
out; while another process leads (or seems to: a frozen leader keeps its advisory lock), the others step in
only LEADER_GRACE_LEASES leases later."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kleinserve.engine import inspect_model
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.pg_coordination import PREVIEW_KEEP_S, Leadership, preview_key
from kleinserve.jobs.postgres import PostgresJobStore
from kleinserve.jobs.store import JobStatus
from kleinserve.media import MediaStore, ReferenceStore
from kleinserve.objects import LocalObjects
from kleinserve.scale import Scale, coordination_for, media_store
from kleinserve.scale.housekeeping import LEADER_GRACE_LEASES, Housekeeper, remove_expired_media
from kleinserve.types import ImageFormat
from tests.scale.queueing import queue_jobs

LEASE_S = 0.5


@pytest.fixture
def keeper(postgres_url: str, tmp_path: Path) -> Iterator[Housekeeper]:
    scale = Scale(postgres_url, None, tmp_path, lease_s=LEASE_S)
    store = PostgresJobStore(postgres_url)
    media = media_store(scale, store, ttl_s=600)
    coordination = coordination_for(scale, store, media, EventHub())
    made = Housekeeper(scale, store, coordination, media, ReferenceStore(media.objects))
    yield made
    made.leadership.close()
    coordination.stop()
    store.close()


def _claimed_job(keeper: Housekeeper, tiny_dir: Path) -> tuple[str, float]:
    (job_id,) = queue_jobs(keeper.store, inspect_model(str(tiny_dir)), 1)
    (claimed,) = keeper.store.claim("frozen-worker", None, 4, LEASE_S)
    assert claimed.id == job_id and claimed.lease_until is not None
    return job_id, claimed.lease_until


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def test_the_leader_requeues_as_soon_as_the_lease_runs_out(keeper: Housekeeper, tiny_dir: Path) -> None:
    job_id, lease_until = _claimed_job(keeper, tiny_dir)
    keeper.tick()
    assert keeper.store.get(job_id).status is JobStatus.RUNNING  # the lease still holds
    _sleep_until(lease_until + 0.1)
    keeper.tick()
    assert keeper.leadership.held()
    assert keeper.store.get(job_id).status is JobStatus.QUEUED


def test_under_a_frozen_leader_the_others_step_in_after_the_grace(
    keeper: Housekeeper, tiny_dir: Path, postgres_url: str
) -> None:
    frozen = Leadership(postgres_url, "kleinserve-housekeeper")
    assert frozen.held()  # another process leads, and then answers no more; its connection stays open
    try:
        job_id, lease_until = _claimed_job(keeper, tiny_dir)
        grace_s = LEADER_GRACE_LEASES * LEASE_S
        _sleep_until(lease_until + grace_s * 0.4)
        keeper.tick()
        assert not keeper.leadership.held()
        assert keeper.store.get(job_id).status is JobStatus.RUNNING  # the leader's turn, for now
        _sleep_until(lease_until + grace_s + 0.3)
        keeper.tick()
        job = keeper.store.get(job_id)
        assert job.status is JobStatus.QUEUED and job.attempts == 1  # runs again, once
    finally:
        frozen.close()


def test_the_media_sweep_removes_previews_after_seconds_and_results_after_their_ttl(tmp_path: Path) -> None:
    media = MediaStore(LocalObjects(tmp_path), b"s" * 32, ttl_s=600)
    result = media.save(b"png", ImageFormat.PNG)
    for step in (1, 2):
        media.objects.put(preview_key("job", step, 0), b"png")
    written = time.time()
    assert remove_expired_media(media, written + PREVIEW_KEEP_S - 1) == 0  # the API may still read them
    assert remove_expired_media(media, written + PREVIEW_KEEP_S + 1) == 2
    assert media.objects.keys("previews/") == [] and media.read(result) == b"png"
    assert remove_expired_media(media, written + 601) == 1
