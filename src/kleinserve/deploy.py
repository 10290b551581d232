"""Ray Serve supervision of kleinserve's GPU workers (the `kleinserve[ray]` extra).

Ray Serve places, health-checks, restarts and autoscales the workers; it never sees a job. Each `GPUWorker`
replica holds one GPU and runs one `kleinserve.scale.worker.WorkerNode`, which pulls batches from the Postgres
job store and writes media to S3, exactly as `kleinserve worker` does under systemd or Kubernetes. Jobs,
leases and retries live in Postgres, so a replica that Serve kills or restarts loses nothing: its leased jobs
are re-queued when the lease runs out. The API tier runs outside Ray behind any load balancer.

    serve run kleinserve.deploy:app database_url=postgresql://kleinserve@db/kleinserve media_url=s3://b/p
    serve run deploy/serve.yaml

This is the only module that imports ray (tests/test_architecture.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import pydantic
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from kleinserve.engine import ModelOptions, inspect_model
from kleinserve.errors import InvalidInput, StoreUnavailable, Unavailable
from kleinserve.jobs.store import LEASE_S
from kleinserve.scale import Scale
from kleinserve.scale.worker import WorkerConfig, WorkerNode, queue_depth

log = logging.getLogger(__name__)

# Between the drain deadline and Serve's force-kill: the retire write and closing the store's pool.
SHUTDOWN_MARGIN_S = 10.0


def wanted_replicas(queued: int, target_per_replica: float, lower: int, upper: int) -> int:
    """Replicas for `queued` jobs waiting: ceil(queued / target_per_replica), within [lower, upper].

    `lower` >= 1 keeps a replica pulling even when the queue is empty: nothing else would notice new work,
    since workers are not sent requests.
    """
    return max(lower, min(upper, math.ceil(queued / target_per_replica)))


class QueueDepthPolicy:
    """Class-based Serve autoscaling policy: replicas follow the Postgres queue of the workers' models.

    Modeled on Ray's `AsyncInferenceAutoscalingPolicy` (ray/serve/async_inference_autoscaling_policy.py,
    2.60), with the broker's queue length replaced by `queue_depth`. Serve's controller builds one instance
    from `policy_kwargs` and calls it on every control-loop tick (~0.1 s) on its event loop, so the call must
    not block: the count is refreshed by one short-lived task every `poll_interval_s` that runs the
    synchronous query on a thread, and each tick answers from the last count. An infinite polling loop would
    keep the instance alive after Serve drops it on redeploy, as Ray's policy explains.

    The target per replica is the deployment's `target_ongoing_requests`, read here as "queued jobs per
    replica". Serve then applies `upscale_delay_s` / `downscale_delay_s` and clips to min/max again.
    """

    def __init__(self, database_url: str, models: list[str], poll_interval_s: float) -> None:
        self._database_url = database_url
        self._models = models
        self._poll_interval_s = poll_interval_s
        self._queued = 0
        self._task: asyncio.Task[None] | None = None
        self._last_poll = -math.inf

    async def _poll_once(self) -> None:
        try:
            self._queued = await asyncio.to_thread(queue_depth, self._database_url, self._models)
        except StoreUnavailable as error:
            # Keep the last count: an outage is no reason to scale either way.
            log.warning("queue depth unavailable, keeping %d: %s", self._queued, error)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        """Replicas wanted now and the policy state Serve keeps for us (the last queued count)."""
        if self._task is not None and self._task.done():
            self._task = None
        now = time.monotonic()
        if self._task is None and now - self._last_poll >= self._poll_interval_s:
            self._last_poll = now
            self._task = asyncio.get_running_loop().create_task(self._poll_once())
        config = cast(AutoscalingConfig, ctx.config)  # the deployment's own: Serve always passes it
        wanted = wanted_replicas(
            self._queued,
            config.get_target_ongoing_requests(),
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
        )
        return wanted, {"queued": self._queued}


# No `__call__` and no HTTP route: a worker pulls its work from Postgres, so nothing is ever sent to it.
# Serve runs a deployment without `__call__` as long as nobody calls it, and the application is deployed with
# `route_prefix: null` (deploy/serve.yaml), so no route leads to it. An ingress would only add a public port
# that does nothing. Serve still starts its proxy per node unless `proxy_location: Disabled` (the tests do);
# KubeRay needs that proxy for its pods' readiness (see deploy/serve.yaml).
class GPUWorker:
    """One replica = one GPU = one `WorkerNode`.

    The constructor loads the model (blocking; Serve counts the replica as starting until it returns) and
    starts the claim loop. `worker_id` is the replica's full id, which is also its Ray actor name, so a job
    row names the replica that ran it.
    """

    def __init__(self, config: WorkerConfig, drain_timeout_s: float) -> None:
        replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self._drain_timeout_s = drain_timeout_s
        self._node: WorkerNode | None = WorkerNode(dataclasses.replace(config, worker_id=replica_id))
        self._node.start()

    def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; raising makes it replace the replica."""
        if self._node is None:
            raise Unavailable("the worker has been drained")
        reason = self._node.health()
        if reason is not None:
            raise Unavailable(reason)

    def __del__(self) -> None:
        # Serve's documented shutdown hook: called once on scale-down, redeploy or replacement, within
        # `graceful_shutdown_timeout_s`. Garbage collection may call it again (or after a failed
        # constructor, without _node): drain once.
        node, self._node = getattr(self, "_node", None), None
        if node is not None:
            node.drain(self._drain_timeout_s)


# Serve's defaults for what worker_application() does not set: a health check every 10 s, 30 s to answer.
GPU_WORKER: Deployment = serve.deployment(name="GPUWorker")(GPUWorker)


class WorkerArgs(pydantic.BaseModel):
    """The application's arguments (`serve run kleinserve.deploy:app key=value ...` or `args:` in a Serve
    config). Strings from the command line are converted; unknown names are refused."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    database_url: str
    media_url: str | None = None  # None: files under data_dir, one machine only
    data_dir: Path = Path(tempfile.gettempdir()) / "kleinserve-worker"
    lease_s: float = pydantic.Field(default=LEASE_S, gt=0)
    # As `kleinserve worker --model/--components/--download/--dtype`; the GPU is the one Ray assigns.
    model: str = "tiny-random"
    components: str | None = None
    download: bool = False
    dtype: str | None = None
    # The name the model's jobs carry (its variant, e.g. flux-2-klein-4b), which the autoscaler counts.
    # Default: read from the model's configs where the application is built, which needs its files there.
    model_name: str | None = None
    max_batch: int = pydantic.Field(default=4, ge=1)
    threads: int | None = pydantic.Field(default=None, ge=1)
    num_cpus: float = pydantic.Field(default=1.0, ge=0)
    min_replicas: int = pydantic.Field(default=1, ge=1)
    max_replicas: int = pydantic.Field(default=1, ge=1)
    # Queued jobs per replica; default: one full batch waiting for each replica.
    target_queued_per_replica: float | None = pydantic.Field(default=None, gt=0)
    poll_interval_s: float = pydantic.Field(default=5.0, gt=0)
    upscale_delay_s: float = pydantic.Field(default=30.0, ge=0)
    downscale_delay_s: float = pydantic.Field(default=600.0, ge=0)
    # At least the longest batch: a replica being stopped finishes its batch before it retires.
    drain_timeout_s: float = pydantic.Field(default=60.0, gt=0)


def worker_application(args: WorkerArgs) -> Application:
    """The `GPUWorker` deployment configured from `args`, bound and ready for `serve.run`."""
    if args.max_replicas < args.min_replicas:
        raise InvalidInput(
            f"max_replicas {args.max_replicas} is below min_replicas {args.min_replicas}",
            param="max_replicas",
            allowed=f">= {args.min_replicas}",
        )
    config = WorkerConfig(
        scale=Scale(args.database_url, args.media_url, args.data_dir, args.lease_s),
        model=ModelOptions(args.model, components=args.components, download=args.download, dtype=args.dtype),
        max_batch=args.max_batch,
        threads=args.threads,
    )
    model_name = args.model_name or inspect_model(args.model, components=args.components).spec.name
    policy = AutoscalingPolicy(
        policy_function=QueueDepthPolicy,
        policy_kwargs={
            "database_url": args.database_url,
            "models": [model_name],
            "poll_interval_s": args.poll_interval_s,
        },
    )
    autoscaling = AutoscalingConfig(
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_queued_per_replica or args.max_batch,
        upscale_delay_s=args.upscale_delay_s,
        downscale_delay_s=args.downscale_delay_s,
        policy=policy,
    )
    return GPU_WORKER.options(
        ray_actor_options={"num_gpus": 1, "num_cpus": args.num_cpus},
        autoscaling_config=autoscaling,
        graceful_shutdown_timeout_s=args.drain_timeout_s + SHUTDOWN_MARGIN_S,
    ).bind(config, args.drain_timeout_s)


def app(args: dict[str, Any]) -> Application:
    """Serve's application builder: validates `args` (see `WorkerArgs`) and builds the worker deployment.

    Raises InvalidInput naming the first wrong argument.
    """
    try:
        parsed = WorkerArgs.model_validate(args)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        raise InvalidInput(
            f"kleinserve.deploy:app: {first['msg']}", param=".".join(str(part) for part in first["loc"])
        ) from error
    return worker_application(parsed)
