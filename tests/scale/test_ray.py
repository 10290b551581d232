"""Ray Serve supervising kleinserve's GPU workers (kleinserve.deploy) on one box: a local Ray cluster for the
module (2 CPUs, 2 logical GPUs), `GPUWorker` replicas on the tiny model with one torch thread each, a real
Postgres and a real S3 endpoint. Each test deploys the application afresh against its own database and bucket.

Ray's start-up seconds and memory are printed (`pytest -s -m ray tests/scale/test_ray.py`); README's Scale out
section quotes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import ray
from ray import serve

from kleinserve.deploy import WorkerArgs, worker_application
from kleinserve.engine import inspect_model
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.pg_coordination import QUEUED
from kleinserve.jobs.postgres import PostgresJobStore
from tests.s3 import S3Media, client, environment
from tests.scale.queueing import queue_jobs

pytestmark = pytest.mark.ray

APP = "workers"
LEASE_S = 3.0  # a killed replica's jobs are queued again after this (production: 20 s)
DEADLINE_S = 90.0  # for anything below to happen on 2 shared cores


def _ray_rss_mib() -> float:
    """Resident memory of every Ray process: this test process's descendants that run Ray (GCS, raylet,
    agents, Serve controller, replicas)."""
    total = 0
    for process in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(process.cmdline()):
                total += process.memory_info().rss
        except psutil.Error:  # ended meanwhile
            continue
    return total / 2**20


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str, kleinserve_cache: Path) -> Iterator[None]:
    """One local Ray for the module: Serve without HTTP proxies (the workers take no requests); every
    process reaches the S3 endpoint and writes the tiny model into the test's cache (kleinserve_cache)."""
    started = time.monotonic()
    ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        object_store_memory=2 * 10**8,
        runtime_env={"env_vars": environment(s3_endpoint)},
    )
    serve.start(proxy_location="Disabled")
    print(f"\nray: started in {time.monotonic() - started:.1f} s, {_ray_rss_mib():.0f} MiB resident")
    yield
    serve.shutdown()
    ray.shutdown()


def _deploy(database_url: str, media: S3Media, model: Path, **options: object) -> None:
    """(Re)deploy the worker application with 1 torch thread and half a CPU per replica; waits until every
    replica has loaded the model."""
    args = WorkerArgs.model_validate(
        {
            "database_url": database_url,
            "media_url": media.url,
            "model": str(model),
            "dtype": "float32",
            "threads": 1,
            "num_cpus": 0.5,
            "max_batch": 2,
            "lease_s": LEASE_S,
            "drain_timeout_s": 10,
            **options,
        }
    )
    serve.run(worker_application(args), name=APP, route_prefix=None)


def _replicas() -> set[str]:
    """The actor names of the application's live replicas: what GPUWorker uses as each one's worker id."""
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#")
    }


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.2)


def _all_ended(store: PostgresJobStore, ids: list[str]) -> list[Job]:
    _wait_for(lambda: all(store.get(job_id).status.terminal for job_id in ids), f"{len(ids)} jobs end")
    return [store.get(job_id) for job_id in ids]


def _assert_images_in_s3(jobs: list[Job], media: S3Media) -> None:
    listing = client(media.endpoint).list_objects_v2(Bucket=media.bucket, Prefix=media.prefix)
    keys = {entry["Key"].rsplit("/", 1)[-1] for entry in listing.get("Contents", [])}
    for job in jobs:
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.result is not None and {image.media for image in job.result.images} <= keys


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresJobStore]:
    opened = PostgresJobStore(postgres_url)
    yield opened
    opened.close()


@pytest.fixture
def deployed(ray_cluster: None) -> Iterator[None]:
    yield
    serve.delete(APP)


def test_two_gpu_replicas_run_the_queue(
    deployed: None, postgres_url: str, s3_media_url: S3Media, store: PostgresJobStore, tiny_dir: Path
) -> None:
    started = time.monotonic()
    _deploy(postgres_url, s3_media_url, tiny_dir, min_replicas=2, max_replicas=2)
    loaded_s = time.monotonic() - started
    print(f"\nray: 2 replicas loaded in {loaded_s:.1f} s; {_ray_rss_mib():.0f} MiB resident")
    replicas = _replicas()
    assert len(replicas) == 2

    model = inspect_model(str(tiny_dir))
    ids = queue_jobs(store, model, 8, steps=12)  # two batches of 4, each long enough for both to be claimed
    with psycopg.connect(postgres_url, autocommit=True) as connection:  # wake both at once, as an API does
        connection.execute("SELECT pg_notify(%s, %s)", (QUEUED, json.dumps({"model": model.spec.name})))
    jobs = _all_ended(store, ids)
    _assert_images_in_s3(jobs, s3_media_url)
    assert {job.worker for job in jobs} == replicas  # both pulled, each under its replica's name
    assert all(job.attempts == 1 for job in jobs)


def test_a_killed_replica_is_restarted_and_its_job_retried(
    deployed: None, postgres_url: str, s3_media_url: S3Media, store: PostgresJobStore, tiny_dir: Path
) -> None:
    _deploy(postgres_url, s3_media_url, tiny_dir, min_replicas=2, max_replicas=2)
    before = _replicas()
    ids = queue_jobs(store, inspect_model(str(tiny_dir)), 6, steps=12)
    running: list[Job] = []

    def some_running() -> bool:
        running[:] = [job for job in map(store.get, ids) if job.status is JobStatus.RUNNING]
        return bool(running)

    _wait_for(some_running, "a batch starts")
    victim = running[0].worker
    assert victim in before
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)  # as a crashed GPU process

    jobs = _all_ended(store, ids)
    _assert_images_in_s3(jobs, s3_media_url)
    retried = {job.id for job in jobs if job.attempts == 2}
    assert {job.id for job in running if job.worker == victim} <= retried
    assert all(job.worker != victim for job in jobs)  # the rerun's worker wrote each result
    _wait_for(lambda: len(_replicas() - before) == 1 and len(_replicas()) == 2, "Serve replaces the replica")


def test_a_queue_above_target_scales_one_to_two_replicas(
    deployed: None, postgres_url: str, s3_media_url: S3Media, store: PostgresJobStore, tiny_dir: Path
) -> None:
    _deploy(
        postgres_url,
        s3_media_url,
        tiny_dir,
        min_replicas=1,
        max_replicas=2,
        target_queued_per_replica=2,
        upscale_delay_s=0,
        poll_interval_s=0.5,
    )
    [first] = _replicas()
    ids = queue_jobs(store, inspect_model(str(tiny_dir)), 24, steps=8)
    _wait_for(lambda: len(_replicas()) == 2, "a second replica for a queue of 24 (target 2 per replica)")
    jobs = _all_ended(store, ids)
    _assert_images_in_s3(jobs, s3_media_url)
