"""SqliteJobStore on a real database file: ownership, queue order, lifecycle, crash recovery, usage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kleinserve.errors import Conflict, NotFound
from kleinserve.jobs.record import JobImage, JobResult, JobUsage
from kleinserve.jobs.store import MAX_ATTEMPTS, Job, JobStatus, Load, SqliteJobStore, new_job_id
from tests.conftest import job_params


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    opened = SqliteJobStore(tmp_path / "db")
    yield opened
    opened.close()


def _job(owner: str = "alice", created: float | None = None, **fields: Any) -> Job:
    return Job(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params=job_params("a red circle"),
        reference_count=0,
        batch_key="(64, 64)",
        created=time.time() if created is None else created,
        **fields,
    )


def test_add_get_round_trips_every_field(store: SqliteJobStore) -> None:
    job = _job(webhook_url="https://example.com/hook", webhook_secret="s", extra={"dialect": "bfl"})
    store.add(job)
    assert store.get(job.id) == job
    assert store.get(job.id, "alice") == job


def test_another_owner_gets_not_found(store: SqliteJobStore) -> None:
    job = store.add(_job("alice"))
    with pytest.raises(NotFound):
        store.get(job.id, "bob")
    with pytest.raises(NotFound):
        store.request_cancel(job.id, "bob")
    with pytest.raises(NotFound):
        store.get("no-such-job")
    assert store.owned("bob") == []
    assert store.get(job.id).status is JobStatus.QUEUED  # bob's cancel did nothing


def test_list_is_per_owner_newest_first_and_filters_status(store: SqliteJobStore) -> None:
    now = time.time()
    first = store.add(_job("alice", now - 3))
    second = store.add(_job("alice", now - 2))
    store.add(_job("bob", now - 1))
    assert [job.id for job in store.owned("alice")] == [second.id, first.id]
    assert [job.id for job in store.owned("alice", limit=1)] == [second.id]
    store.mark_running([first.id])
    assert [job.id for job in store.owned("alice", JobStatus.RUNNING)] == [first.id]
    assert [job.id for job in store.owned("alice", JobStatus.QUEUED)] == [second.id]


def test_queued_is_oldest_first_and_only_queued(store: SqliteJobStore) -> None:
    now = time.time()
    young = store.add(_job("bob", now))
    old = store.add(_job("alice", now - 10))
    middle = store.add(_job("carol", now - 5))
    assert [job.id for job in store.queued()] == [old.id, middle.id, young.id]
    assert [job.id for job in store.queued(limit=2)] == [old.id, middle.id]
    store.mark_running([old.id])
    assert [job.id for job in store.queued()] == [middle.id, young.id]


def test_mark_running_counts_attempts_and_only_claims_queued_jobs(store: SqliteJobStore) -> None:
    job = store.add(_job())
    other = store.add(_job())
    store.request_cancel(other.id, "alice")
    store.mark_running([job.id, other.id])
    running = store.get(job.id)
    assert running.status is JobStatus.RUNNING
    assert running.attempts == 1
    assert running.started is not None
    assert running.progress == 0
    assert store.get(other.id).status is JobStatus.CANCELLED  # a cancelled job is never claimed
    store.mark_running([job.id])  # already running: not claimed again
    assert store.get(job.id).attempts == 1


def test_progress_and_finish(store: SqliteJobStore) -> None:
    job = store.add(_job())
    store.mark_running([job.id])
    store.set_progress(job.id, 0.5)
    assert store.get(job.id).progress == 0.5
    result = JobResult(images=(JobImage(media="a.png", seed=1),), width=64, height=64, steps=2, guidance=1.0)
    usage = JobUsage(images=1, tiles_out=1)
    done = store.finish(job.id, JobStatus.SUCCEEDED, result=result, usage=usage)
    assert done.status is JobStatus.SUCCEEDED
    assert done.progress == 1.0
    assert done.result == result
    assert done.usage == usage
    assert done.finished is not None and done.started is not None and done.finished >= done.started
    failed = store.add(_job())
    store.mark_running([failed.id])
    assert store.finish(failed.id, JobStatus.FAILED, error="boom").error == "boom"


def test_request_cancel_queued_is_at_once_running_is_flagged(store: SqliteJobStore) -> None:
    queued = store.add(_job())
    cancelled = store.request_cancel(queued.id, "alice")
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.error == "cancelled by the client"
    assert cancelled.finished is not None
    running = store.add(_job())
    store.mark_running([running.id])
    flagged = store.request_cancel(running.id, "alice")
    assert flagged.status is JobStatus.RUNNING
    assert flagged.cancel_requested is True
    done = store.add(_job())
    store.mark_running([done.id])
    store.finish(done.id, JobStatus.SUCCEEDED)
    with pytest.raises(Conflict, match="has already ended \\(succeeded\\)"):
        store.request_cancel(done.id, "alice")
    assert store.get(done.id).status is JobStatus.SUCCEEDED  # terminal stays


def test_load_counts_all_queued_jobs_and_one_owners_in_flight(store: SqliteJobStore) -> None:
    a, b, c = store.add(_job()), store.add(_job()), store.add(_job())
    store.add(_job("bob"))
    assert store.load("alice") == Load(queued=4, in_flight=3)
    store.mark_running([a.id])
    assert store.load("alice") == Load(queued=3, in_flight=3)  # running is in flight, not queued
    store.finish(a.id, JobStatus.SUCCEEDED)
    store.request_cancel(b.id, "alice")
    assert store.load("alice") == Load(queued=2, in_flight=1)
    assert store.load("bob") == Load(queued=2, in_flight=1)
    assert store.load("nobody") == Load(queued=2, in_flight=0)
    assert c.id in {job.id for job in store.queued()}


def test_finish_of_an_unknown_job_is_not_found(store: SqliteJobStore) -> None:
    with pytest.raises(NotFound):
        store.finish("no-such-job", JobStatus.FAILED, error="boom")


def test_recover_requeues_once_then_fails_with_a_reason(tmp_path: Path) -> None:
    database = tmp_path / "db"
    store = SqliteJobStore(database)
    job = store.add(_job())
    left_alone = store.add(_job())
    cancelling = store.add(_job())
    store.mark_running([job.id, cancelling.id])
    store.set_progress(job.id, 0.5)
    store.request_cancel(cancelling.id, "alice")
    store.close()

    store = SqliteJobStore(database)  # "after the crash"
    recovered = {job.id: job for job in store.recover()}
    assert set(recovered) == {job.id, cancelling.id}
    assert recovered[job.id].status is JobStatus.QUEUED
    assert recovered[job.id].progress == 0
    assert recovered[cancelling.id].status is JobStatus.CANCELLED
    assert store.get(left_alone.id).status is JobStatus.QUEUED
    assert store.recover() == []  # nothing is running any more

    store.mark_running([job.id])  # the retry
    assert store.get(job.id).attempts == MAX_ATTEMPTS
    store.close()
    store = SqliteJobStore(database)  # crashed again
    (failed,) = store.recover()
    assert failed.status is JobStatus.FAILED
    assert failed.error == f"interrupted {MAX_ATTEMPTS} times by a server crash"
    assert failed.finished is not None
    store.close()


def test_usage_lists_succeeded_jobs_of_an_owner_since_a_time(store: SqliteJobStore) -> None:
    now = time.time()
    old = store.add(_job("alice", now - 100))
    new = store.add(_job("alice", now - 1))
    bobs = store.add(_job("bob", now - 1))
    failed = store.add(_job("alice", now - 1))
    queued = store.add(_job("alice", now - 1))
    for job in (old, new, bobs, failed):
        store.mark_running([job.id])
    for job in (old, new, bobs):
        store.finish(job.id, JobStatus.SUCCEEDED, usage=JobUsage(images=1))
    store.finish(failed.id, JobStatus.FAILED, error="boom")
    assert [job.id for job in store.usage("alice")] == [old.id, new.id]
    assert [job.id for job in store.usage("alice", since=now - 50)] == [new.id]
    assert [job.id for job in store.usage(since=now - 50)] in ([new.id, bobs.id], [bobs.id, new.id])
    assert {job.id for job in store.usage()} == {old.id, new.id, bobs.id}
    assert store.usage("alice")[0].usage == JobUsage(images=1)
    assert queued.id not in {job.id for job in store.usage()}
