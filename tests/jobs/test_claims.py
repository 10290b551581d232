"""PostgresJobStore under real concurrency: threads with store objects of their own (as separate processes
would have) race on one database. Claims, expired leases and the webhook outbox never hand a row to two
callers (FOR UPDATE SKIP LOCKED), a key's submit limit holds (an advisory lock), and processes starting at
once migrate once."""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import psycopg
import pytest

from kleinserve.errors import Overloaded
from kleinserve.jobs.postgres import PostgresJobStore
from kleinserve.jobs.store import Job, JobStatus, SubmitLimits, new_job_id
from tests.conftest import job_params

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

THREADS = 4
Result = TypeVar("Result")


@pytest.fixture
def stores(postgres_url: str) -> Iterator[list[PostgresJobStore]]:
    """One store (one connection) per thread, and one more for the test itself (the last)."""
    opened = [PostgresJobStore(postgres_url, min_size=1, max_size=1) for _ in range(THREADS + 1)]
    yield opened
    for store in opened:
        store.close()


def _race(count: int, task: Callable[[int], Result]) -> list[Result]:
    """`task(i)` on `count` threads that start together; their results in thread order."""
    start = threading.Barrier(count)
    results: list[Result | BaseException] = [RuntimeError("did not run")] * count

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = task(index)
        except BaseException as exc:  # re-raised below, on the test's thread
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def _job(owner: str, batch_key: str, images: int = 1, created: float | None = None, **fields: object) -> Job:
    return Job(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params=job_params(num_images=images),
        reference_count=0,
        batch_key=batch_key,
        created=time.time() if created is None else created,
        **fields,  # type: ignore[arg-type]
    )


def test_concurrent_claims_take_every_job_once_in_one_key_batches(stores: list[PostgresJobStore]) -> None:
    rng = random.Random(16)
    start = time.time() - 100
    jobs = [
        stores[-1].add(_job("alice", f"key-{rng.randrange(4)}", rng.choice((1, 1, 2)), start + index))
        for index in range(40)
    ]

    def claim_until_empty(index: int) -> list[list[Job]]:
        batches = []
        while batch := stores[index].claim(f"worker-{index}", None, max_images=4):
            batches.append(batch)
        return batches

    batches = [batch for batches in _race(THREADS, claim_until_empty) for batch in batches]
    claimed = [job.id for batch in batches for job in batch]
    assert len(claimed) == len(set(claimed)) == len(jobs)  # every job, none twice
    keys = {job.id: job.batch_key for job in jobs}
    for batch in batches:
        assert len({keys[job.id] for job in batch}) == 1
        assert len({(job.fence, job.worker) for job in batch}) == 1
        assert len(batch) == 1 or sum(job.params.num_images for job in batch) <= 4
    assert len({batch[0].fence for batch in batches}) == len(batches)
    assert stores[-1].queue_depth() == 0


def test_concurrent_submits_of_one_key_stop_at_its_limit(
    stores: list[PostgresJobStore], postgres_url: str
) -> None:
    limits = SubmitLimits(max_waiting=100, max_in_flight_per_key=5)
    submitters = 8
    extra = [PostgresJobStore(postgres_url, max_size=1) for _ in range(submitters - THREADS)]
    everyone = [*stores[:THREADS], *extra]

    def submit_three(index: int) -> list[str]:
        outcomes = []
        for _ in range(3):
            try:
                everyone[index].submit(_job("alice", "key"), limits)
                outcomes.append("accepted")
            except Overloaded as exc:
                outcomes.append(exc.message)
        return outcomes

    try:
        outcomes = collections.Counter(o for result in _race(submitters, submit_three) for o in result)
    finally:
        for store in extra:
            store.close()
    assert outcomes == {"accepted": 5, "5 jobs of this key are in flight (limit 5)": 3 * submitters - 5}
    assert stores[-1].load("alice").in_flight == 5


def test_concurrent_housekeepers_and_deliverers_never_share_a_row(stores: list[PostgresJobStore]) -> None:
    for index in range(20):
        stores[-1].add(_job("alice", f"key-{index}", webhook_url="https://example.com/hook"))
    for _ in range(20):
        stores[-1].claim("gone", None, max_images=1, lease_s=0.01)
    time.sleep(0.05)
    requeued = [job.id for jobs in _race(THREADS, lambda i: stores[i].requeue_expired()) for job in jobs]
    assert len(requeued) == len(set(requeued)) == 20
    for job in stores[-1].queued():
        stores[-1].finish(job.id, JobStatus.FAILED, error="boom")
    delivered = [
        job.id
        for jobs in _race(THREADS, lambda i: stores[i].claim_webhooks(f"api-{i}", 20, 60))
        for job in jobs
    ]
    assert len(delivered) == len(set(delivered)) == 20


def test_processes_starting_at_once_migrate_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database(template="template0")  # empty: nothing migrated yet
    opened = _race(THREADS, lambda _: PostgresJobStore(url, min_size=0, max_size=1))
    for store in opened:
        store.close()
    with psycopg.connect(url) as connection:
        versions = connection.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(1,), (2,)]
