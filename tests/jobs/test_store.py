"""The job store's contract, on both stores (ids [sqlite], [postgres]): ownership, queue order, lifecycle,
crash recovery, usage; claims, leases and fences, submit limits, the webhook outbox, workers, shared secrets.
Real databases: a SQLite file, and the session's PostgreSQL (tests/postgres.py) with a database per test."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kleinserve.errors import Conflict, NotFound, Overloaded, StoreUnavailable
from kleinserve.jobs.postgres import PostgresJobStore
from kleinserve.jobs.record import JobImage, JobResult, JobUsage, to_json
from kleinserve.jobs.store import (
    MAX_ATTEMPTS,
    Job,
    JobStatus,
    JobStore,
    LeaseLost,
    Load,
    SqliteJobStore,
    StepCheck,
    SubmitLimits,
    new_job_id,
)
from kleinserve.types import json_bytes
from tests.conftest import job_params

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

Opener = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on this test's database (another object, as another process would); all closed after."""
    opened: list[JobStore] = []

    def open_one() -> JobStore:
        if request.param == "sqlite":
            store: JobStore = SqliteJobStore(tmp_path / "db")
        else:
            store = PostgresJobStore(url, min_size=0, max_size=2)
        opened.append(store)
        return store

    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Opener) -> JobStore:
    return open_store()


def _job(owner: str = "alice", created: float | None = None, **fields: Any) -> Job:
    images = fields.pop("images", 1)
    return Job(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params=job_params("a red circle", num_images=images),
        reference_count=0,
        batch_key=fields.pop("batch_key", "(64, 64)"),
        created=time.time() if created is None else created,
        **fields,
    )


def _queue(store: JobStore, *specs: dict[str, Any]) -> list[Job]:
    """Jobs added one second apart, oldest first, each with the fields of its spec."""
    start = time.time() - len(specs)
    return [store.add(_job(created=start + index, **spec)) for index, spec in enumerate(specs)]


def _ids(jobs: list[Job]) -> list[str]:
    return [job.id for job in jobs]


def test_add_get_round_trips_every_field(store: JobStore) -> None:
    job = _job(webhook_url="https://example.com/hook", webhook_secret="s", extra={"dialect": "x"}, model="m")
    store.add(job)
    assert store.get(job.id) == job
    assert store.get(job.id, "alice") == job


def test_another_owner_gets_not_found(store: JobStore) -> None:
    job = store.add(_job("alice"))
    with pytest.raises(NotFound):
        store.get(job.id, "bob")
    with pytest.raises(NotFound):
        store.request_cancel(job.id, "bob")
    with pytest.raises(NotFound):
        store.get("no-such-job")
    assert store.owned("bob") == []
    assert store.get(job.id).status is JobStatus.QUEUED  # bob's cancel did nothing


def test_list_is_per_owner_newest_first_and_filters_status(store: JobStore) -> None:
    now = time.time()
    first = store.add(_job("alice", now - 3))
    second = store.add(_job("alice", now - 2))
    store.add(_job("bob", now - 1))
    assert [job.id for job in store.owned("alice")] == [second.id, first.id]
    assert [job.id for job in store.owned("alice", limit=1)] == [second.id]
    store.mark_running([first.id])
    assert [job.id for job in store.owned("alice", JobStatus.RUNNING)] == [first.id]
    assert [job.id for job in store.owned("alice", JobStatus.QUEUED)] == [second.id]


def test_queued_is_oldest_first_and_only_queued(store: JobStore) -> None:
    now = time.time()
    young = store.add(_job("bob", now))
    old = store.add(_job("alice", now - 10))
    middle = store.add(_job("carol", now - 5))
    assert [job.id for job in store.queued()] == [old.id, middle.id, young.id]
    assert [job.id for job in store.queued(limit=2)] == [old.id, middle.id]
    store.mark_running([old.id])
    assert [job.id for job in store.queued()] == [middle.id, young.id]


def test_mark_running_counts_attempts_and_only_claims_queued_jobs(store: JobStore) -> None:
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


def test_progress_and_finish(store: JobStore) -> None:
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


def test_request_cancel_queued_is_at_once_running_is_flagged(store: JobStore) -> None:
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


def test_load_counts_all_queued_jobs_and_one_owners_in_flight(store: JobStore) -> None:
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


def test_finish_of_an_unknown_job_is_not_found(store: JobStore) -> None:
    with pytest.raises(NotFound):
        store.finish("no-such-job", JobStatus.FAILED, error="boom")
    with pytest.raises(NotFound):
        store.finish("no-such-job", JobStatus.FAILED, fence=1, error="boom")


def test_recover_requeues_once_then_fails_with_a_reason(open_store: Opener) -> None:
    store = open_store()
    job = store.add(_job())
    left_alone = store.add(_job())
    cancelling = store.add(_job())
    store.mark_running([job.id, cancelling.id])
    store.set_progress(job.id, 0.5)
    store.request_cancel(cancelling.id, "alice")
    store.close()

    store = open_store()  # "after the crash"
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
    store = open_store()  # crashed again
    (failed,) = store.recover()
    assert failed.status is JobStatus.FAILED
    assert failed.error == f"interrupted {MAX_ATTEMPTS} times by a server crash"
    assert failed.finished is not None


def test_usage_lists_succeeded_jobs_of_an_owner_since_a_time(store: JobStore) -> None:
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


# claims, leases and fences


def test_claim_takes_the_oldest_jobs_key_and_model_while_images_fit(store: JobStore) -> None:
    head, other_key, joins, too_big, small, other_model = _queue(
        store,
        {"images": 2},
        {"batch_key": "(128, 128)"},
        {"images": 1},
        {"images": 2},  # 2 + 1 + 2 > 4: skipped, and a younger, smaller one may still join
        {"images": 1},
        {"model": "other"},
    )
    before = time.time()
    batch = store.claim("w1", None, max_images=4, lease_s=30)
    assert _ids(batch) == [head.id, joins.id, small.id]
    fence = batch[0].fence
    for job in batch:
        assert job.status is JobStatus.RUNNING and job.worker == "w1" and job.fence == fence
        assert job.attempts == 1 and job.progress == 0 and job.started is not None and job.started >= before
        assert job.lease_until is not None and before + 30 <= job.lease_until <= time.time() + 30
        assert store.get(job.id) == job
    assert _ids(store.queued()) == [other_key.id, too_big.id, other_model.id]
    assert _ids(store.claim("w2", None, max_images=4)) == [other_key.id]
    assert _ids(store.claim("w2", None, max_images=4)) == [too_big.id]
    assert _ids(store.claim("w2", None, max_images=4)) == [other_model.id]
    assert store.claim("w2", None, max_images=4) == []


def test_claim_always_takes_the_head_even_past_max_images(store: JobStore) -> None:
    big, small = _queue(store, {"images": 6}, {"images": 1})
    assert _ids(store.claim("w", None, max_images=4)) == [big.id]
    assert _ids(store.claim("w", None, max_images=4)) == [small.id]


def test_claim_serves_only_the_workers_models_and_jobs_for_any(store: JobStore) -> None:
    mine, any_model, theirs = _queue(store, {"model": "klein-4b"}, {"model": ""}, {"model": "klein-9b"})
    assert store.queue_depth() == 3
    assert store.queue_depth(["klein-4b"]) == 2  # its own and the one for any model
    assert store.queue_depth(["flux-1"]) == 1
    assert _ids(store.claim("w", ["klein-4b"], max_images=4)) == [mine.id]
    assert _ids(store.claim("w", ["klein-4b"], max_images=4)) == [any_model.id]
    assert store.claim("w", ["klein-4b"], max_images=4) == []
    assert _ids(store.claim("w", ["klein-9b", "klein-4b"], max_images=4)) == [theirs.id]
    assert store.queue_depth() == 0


def test_fences_increase_with_every_claim_across_store_objects(open_store: Opener) -> None:
    first, second = open_store(), open_store()
    _queue(first, *({"batch_key": str(index)} for index in range(4)))
    fences = [store.claim("w", None, 4)[0].fence for store in (first, second, second, first)]
    assert fences == sorted(fences) and len(set(fences)) == 4 and fences[0] > 0


def test_extend_renews_the_lease_and_reports_cancels_and_lost_jobs(store: JobStore) -> None:
    _queue(store, {}, {}, {})
    batch = store.claim("w", None, max_images=4, lease_s=5)
    fence = batch[0].fence
    a, b, c = _ids(batch)
    store.request_cancel(b, "alice")
    store.finish(c, JobStatus.FAILED, error="ended elsewhere")
    check = store.extend([a, b, c], fence, lease_s=60, progress=0.5)
    assert check == StepCheck(cancel_requested=frozenset({b}), lost=frozenset({c}))
    extended = store.get(a)
    assert extended.progress == 0.5 and extended.lease_until is not None
    assert extended.lease_until >= time.time() + 55
    assert store.get(c).progress == 0  # a lost job is not touched
    assert store.extend([a], fence).lost == frozenset()  # progress unchanged when not given
    assert store.get(a).progress == 0.5
    assert store.extend([a], fence + 1).lost == frozenset({a})  # another fence holds nothing
    assert store.extend([], fence) == StepCheck(frozenset(), frozenset())


def test_finish_with_a_stale_fence_is_lease_lost_and_writes_nothing(store: JobStore) -> None:
    (job,) = _queue(store, {})
    (stale,) = store.claim("w1", None, 4, lease_s=1)
    (requeued,) = store.requeue_expired(now=time.time() + 2)
    assert requeued.status is JobStatus.QUEUED
    (rerun,) = store.claim("w2", None, 4)
    assert rerun.fence > stale.fence and rerun.attempts == 2
    with pytest.raises(LeaseLost):
        store.finish(job.id, JobStatus.SUCCEEDED, fence=stale.fence, error="the stale worker's")
    assert store.get(job.id) == rerun  # nothing written
    done = store.finish(job.id, JobStatus.SUCCEEDED, fence=rerun.fence)
    assert done.status is JobStatus.SUCCEEDED
    with pytest.raises(LeaseLost):  # ended: no fence holds it any more
        store.finish(job.id, JobStatus.FAILED, fence=rerun.fence, error="late")
    assert store.get(job.id) == done


def test_requeue_expired_requeues_fails_after_max_attempts_and_cancels(store: JobStore) -> None:
    exhausted, again, cancelling, alive = _queue(store, *({"batch_key": str(index)} for index in range(4)))
    store.claim("w", None, 4, lease_s=10)  # exhausted's first run
    assert _ids(store.requeue_expired(now=time.time() + 20)) == [exhausted.id]
    for _ in range(3):  # exhausted's second run, again's and cancelling's first
        store.claim("w", None, 4, lease_s=10)
    store.request_cancel(cancelling.id, "alice")
    store.set_progress(again.id, 0.5)
    (alive_claim,) = store.claim("w", None, 4, lease_s=100)
    assert alive_claim.id == alive.id
    assert store.requeue_expired() == []  # no lease has ended yet
    changed = {job.id: job for job in store.requeue_expired(now=time.time() + 50)}
    assert set(changed) == {again.id, exhausted.id, cancelling.id}
    requeued = changed[again.id]
    assert requeued.status is JobStatus.QUEUED and requeued.progress == 0
    assert requeued.worker is None and requeued.lease_until is None
    failed = changed[exhausted.id]
    assert failed.status is JobStatus.FAILED and failed.finished is not None
    assert failed.error == f"its worker stopped answering {MAX_ATTEMPTS} times"
    cancelled = changed[cancelling.id]
    assert (cancelled.status, cancelled.error) == (JobStatus.CANCELLED, "cancelled by the client")
    assert {job.id: job for job in map(store.get, changed)} == changed
    assert store.get(alive.id).status is JobStatus.RUNNING
    assert _ids(store.queued()) == [again.id]


def test_submit_adds_within_the_limits_and_refuses_past_them(store: JobStore) -> None:
    limits = SubmitLimits(max_waiting=3, max_in_flight_per_key=2)
    assert store.submit(_job("alice"), limits) == Load(queued=0, in_flight=0)
    assert store.submit(_job("alice"), limits) == Load(queued=1, in_flight=1)
    refused = _job("alice")
    with pytest.raises(Overloaded, match=r"^2 jobs of this key are in flight \(limit 2\)$") as caught:
        store.submit(refused, limits)
    assert caught.value.retry_after == 5
    with pytest.raises(NotFound):
        store.get(refused.id)
    assert store.submit(_job("bob"), limits) == Load(queued=2, in_flight=0)
    with pytest.raises(Overloaded, match=r"^3 jobs are waiting \(limit 3\)$"):
        store.submit(_job("carol"), limits)
    assert store.load("nobody") == Load(queued=3, in_flight=0)


# the webhook outbox, workers, shared secrets


def test_webhook_outbox_claims_are_exclusive_until_they_lapse(open_store: Opener) -> None:
    first, second = open_store(), open_store()
    hooked = [first.add(_job(created=time.time() + i, webhook_url=f"https://e.com/{i}")) for i in range(3)]
    plain = first.add(_job())
    for job in (*hooked, plain):
        first.finish(job.id, JobStatus.FAILED, error="boom")
    assert _ids(first.claim_webhooks("api-1", limit=2, lease_s=0.5)) == [hooked[0].id, hooked[1].id]
    assert _ids(second.claim_webhooks("api-2", 5, 0.5)) == [hooked[2].id]
    assert first.claim_webhooks("api-1", 5, 0.5) == []  # every one is held
    time.sleep(0.6)
    first.set_webhook_status(hooked[0].id, "delivered")
    assert _ids(second.claim_webhooks("api-2", 5, 60)) == [hooked[1].id, hooked[2].id]
    assert first.claim_webhooks("api-1", 5, 60) == []
    assert {job.id for job in first.pending_webhooks()} == {hooked[1].id, hooked[2].id}


def test_shared_secret_is_made_once_for_every_store_object(open_store: Opener) -> None:
    first, second = open_store(), open_store()
    secret = first.shared_secret("media")
    assert len(secret) == 32
    assert second.shared_secret("media", 64) == secret == first.shared_secret("media")
    assert second.shared_secret("other", 16) != secret and len(second.shared_secret("other")) == 16


def test_advertised_models_are_served_until_they_expire_or_retire(store: JobStore) -> None:
    assert store.served_models() == set()
    store.advertise("w1", ["klein-4b"], ttl_s=60)
    store.advertise("w2", ["klein-9b", "klein-4b"], ttl_s=0.2)
    assert store.served_models() == {"klein-4b", "klein-9b"}
    time.sleep(0.3)
    assert store.served_models() == {"klein-4b"}
    store.advertise("w2", ["klein-base-4b"], ttl_s=60)  # renewed, with other models
    assert store.served_models() == {"klein-4b", "klein-base-4b"}
    store.retire("w1")
    assert store.served_models() == {"klein-base-4b"}


# each store's own: SQLite's upgrade of a first-release file, PostgreSQL's outage

# The schema the first release created (and nothing else), with one of its rows: a job of 3 images.
_FIRST_RELEASE = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, params TEXT NOT NULL,
    reference_count INTEGER NOT NULL, batch_key TEXT NOT NULL, created REAL NOT NULL, started REAL,
    finished REAL, progress REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    result TEXT, usage TEXT, webhook_url TEXT, webhook_secret TEXT, webhook_status TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0, extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX jobs_by_status ON jobs (status, created);
CREATE INDEX jobs_by_owner ON jobs (owner, created);
CREATE INDEX jobs_with_pending_webhook ON jobs (finished)
    WHERE webhook_url IS NOT NULL AND webhook_status IS NULL;
"""


def test_a_first_release_sqlite_database_opens_with_its_jobs(tmp_path: Path) -> None:
    database = tmp_path / "kleinserve.db"
    old = _job(images=3, webhook_url="https://example.com/hook", extra={"dialect": "x"})
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.executescript(_FIRST_RELEASE)
        db.execute(
            "INSERT INTO jobs (id, owner, status, params, reference_count, batch_key, created, webhook_url, "
            "extra) VALUES (?, ?, 'queued', ?, 0, ?, ?, ?, ?)",
            (old.id, old.owner, json_bytes(to_json(old.params)).decode(), old.batch_key, old.created,
             old.webhook_url, '{"dialect": "x"}'),
        )  # fmt: skip
    store = SqliteJobStore(database)
    assert store.get(old.id) == old  # every new field at its default: model "" (any), no claim
    store.add(_job(created=old.created + 1))
    assert _ids(store.claim("w", ["klein-4b"], max_images=3)) == [old.id]  # its 3 images were counted
    store.close()
    store = SqliteJobStore(database)  # opened again: nothing to migrate
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [(1,), (2,)]
    assert store.get(old.id).status is JobStatus.RUNNING and len(store.queued()) == 1
    store.close()


def test_postgres_outage_is_store_unavailable_and_service_resumes_by_itself(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    store = PostgresJobStore(postgres_url, max_size=2, timeout_s=1)
    try:
        job = store.add(_job())
        postgres_server.kill()
        try:
            with pytest.raises(StoreUnavailable, match="cannot be used right now"):
                store.get(job.id)
            with pytest.raises(StoreUnavailable):
                store.add(_job())
        finally:
            postgres_server.start_again()
        assert store.get(job.id) == job  # the first call after the restart: no wait for a reconnect
        store.check_writable()
    finally:
        store.close()
