"""kleinserve.deploy without a Ray cluster: the replica arithmetic, the application builder's arguments, and
the autoscaling policy reading a real Postgres queue."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from ray.serve._private.build_app import build_app
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from kleinserve.deploy import QueueDepthPolicy, app, wanted_replicas
from kleinserve.engine import inspect_model
from kleinserve.errors import InvalidInput
from kleinserve.jobs.postgres import PostgresJobStore
from tests.scale.queueing import queue_jobs

DATABASE_URL = "postgresql://kleinserve@db/kleinserve"


@pytest.mark.parametrize(
    ("queued", "target", "lower", "upper", "wanted"),
    [
        (0, 4, 1, 8, 1),  # an empty queue keeps min_replicas pulling
        (4, 4, 1, 8, 1),
        (5, 4, 1, 8, 2),  # ceil: a partial batch waiting is worth a replica
        (100, 4, 1, 8, 8),
        (9, 4, 3, 8, 3),
        (3, 0.5, 1, 8, 6),
    ],
)
def test_wanted_replicas(queued: int, target: float, lower: int, upper: int, wanted: int) -> None:
    assert wanted_replicas(queued, target, lower, upper) == wanted


def test_the_builder_converts_command_line_strings() -> None:
    # `serve run kleinserve.deploy:app max_batch=2 ...` passes every value as a string.
    bound = app({"database_url": DATABASE_URL, "max_batch": "2", "drain_timeout_s": "30", "data_dir": "/x"})
    [deployment] = build_app(bound, name="workers").deployments
    config, drain_timeout_s = deployment.init_args
    assert (config.scale.database_url, config.max_batch, str(config.scale.data_dir), drain_timeout_s) == (
        DATABASE_URL,
        2,
        "/x",
        30.0,
    )
    assert config.scale.media_url is None  # the local data dir


@pytest.mark.parametrize(
    ("args", "param"),
    [
        ({}, "database_url"),
        ({"database_url": DATABASE_URL, "min_replicas": "0"}, "min_replicas"),  # nothing would pull
        ({"database_url": DATABASE_URL, "min_replicas": "3", "max_replicas": "2"}, "max_replicas"),
        ({"database_url": DATABASE_URL, "max_batch": "four"}, "max_batch"),
        ({"database_url": DATABASE_URL, "worker_id": "w"}, "worker_id"),  # each replica names itself
    ],
)
def test_the_builder_names_a_wrong_argument(args: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        app(args)
    assert raised.value.param == param


def _context(current: int, lower: int = 1, upper: int = 4, target: float = 2.0) -> AutoscalingContext:
    """What Serve's controller hands a policy on each tick, with the fields QueueDepthPolicy reads."""
    config = AutoscalingConfig(min_replicas=lower, max_replicas=upper, target_ongoing_requests=target)
    return AutoscalingContext(
        deployment_id=DeploymentID(name="GPUWorker", app_name="workers"),
        deployment_name="GPUWorker",
        app_name="workers",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=[],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics={},
        raw_metrics={},
        capacity_adjusted_min_replicas=lower,
        capacity_adjusted_max_replicas=upper,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def _ticks(policy: QueueDepthPolicy, ctx: AutoscalingContext, seconds: float) -> list[tuple[int, int]]:
    """(replicas asked for, queued count seen) at each tick over `seconds`, ticking as Serve's controller
    does: on an event loop, here every 50 ms (its polls run meanwhile, poll_interval_s apart)."""

    async def run() -> list[tuple[int, int]]:
        seen = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            wanted, state = policy(ctx)
            seen.append((wanted, state["queued"]))
            await asyncio.sleep(0.05)
        return seen

    return asyncio.run(run())


def test_the_policy_asks_for_the_queue_of_its_model(postgres_url: str, tiny_dir: Path) -> None:
    store = PostgresJobStore(postgres_url)
    try:
        resolver = inspect_model(str(tiny_dir))
        policy = QueueDepthPolicy(postgres_url, [resolver.spec.name], poll_interval_s=0.2)
        assert set(_ticks(policy, _context(current=1), 1.0)) == {(1, 0)}  # min_replicas, nothing queued
        queue_jobs(store, resolver, 5)
        assert _ticks(policy, _context(current=1, target=2.0), 1.0)[-1] == (3, 5)  # ceil(5 / 2)
        assert _ticks(policy, _context(current=3, upper=2), 0.1)[-1] == (2, 5)  # max_replicas
        other = QueueDepthPolicy(postgres_url, ["another-model"], poll_interval_s=0.2)
        assert set(_ticks(other, _context(current=2), 1.0)) == {(1, 0)}  # other models' jobs do not count
    finally:
        store.close()
