"""Jobs queued straight into a store, as an API process's intake queues them (jobs/intake.py), for the tests
that need work waiting without running an API process."""

from __future__ import annotations

import time

from kleinserve.engine import SpecResolver
from kleinserve.jobs.job import Job, JobStatus, SubmitLimits, new_job_id
from kleinserve.jobs.record import JobParams
from kleinserve.jobs.store import JobStore
from kleinserve.types import GenerateRequest

UNLIMITED = SubmitLimits(max_waiting=1000, max_in_flight_per_key=1000)


def queue_jobs(store: JobStore, resolver: SpecResolver, count: int, steps: int = 2) -> list[str]:
    """Queue `count` compatible 64x64 jobs of `resolver`'s model (seeds 0, 1 ...): their ids, oldest first."""
    ids = []
    for seed in range(count):
        request = GenerateRequest(prompt="a red circle", width=64, height=64, steps=steps, seed=seed)
        resolved = resolver.resolve(request)
        job = Job(
            id=new_job_id(),
            owner="scale-test",
            status=JobStatus.QUEUED,
            params=JobParams.from_resolved(resolved),
            reference_count=0,
            batch_key=repr(resolved.batch_key),
            created=time.time(),
            model=resolver.spec.name,
        )
        store.submit(job, UNLIMITED)
        ids.append(job.id)
    return ids
