"""The serving commands: `kleinserve serve` (one box) and the scaled-out processes `kleinserve api` and
`kleinserve worker` (their parts: kleinserve/scale/).

`api` and `worker` take `--database-url` (PostgreSQL: jobs, keys, usage) and `--media-url` (`s3://bucket/prefix`,
credentials from the AWS_* variables; without it the data dir, which only works when every process shares that
folder). SIGTERM/SIGINT drains either: the API finishes its open requests, the worker its running batch; a
second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from kleinserve.cli_options import CONNECTION_FLAGS, model_options
from kleinserve.logs import configure

if TYPE_CHECKING:  # the server and the scale-out modules load torch and psycopg: only when a command runs
    from kleinserve.api.server import ServerSettings
    from kleinserve.scale import Scale


def run(args: argparse.Namespace) -> int:
    configure()  # JSON lines on stderr, model loading included
    if args.command == "serve":
        return _serve(args)
    from kleinserve.scale import Scale

    scale = Scale(args.database_url, args.media_url, args.data_dir, args.lease_seconds)
    if args.command == "api":
        return _api(args, scale)
    return _worker(args, scale)


def _serve(args: argparse.Namespace) -> int:
    from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore, check_open_binding
    from kleinserve.api.limits import check_port_free

    # Before importing the server (torch, diffusers: seconds) and before minutes of model loading.
    check_port_free(args.host, args.port)
    keys = SqliteKeyStore(args.data_dir / DATABASE_NAME)
    try:
        check_open_binding(args.host, keys, args.insecure_no_auth)
    finally:
        keys.close()

    from kleinserve.api.server import serve

    settings = server_settings(args, max_batch=args.max_batch)
    model = model_options(args)
    serve(settings, lambda: model.load(lora_dir=settings.lora_dir, lora_downloads=settings.lora_downloads))
    return 0


def server_settings(args: argparse.Namespace, **more: Any) -> ServerSettings:
    """The HTTP server's settings from `serve`'s and `api`'s flags; `more`: other ServerSettings fields."""
    from kleinserve.api.limits import ConnectionLimits
    from kleinserve.api.server import ServerSettings

    return ServerSettings(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        max_waiting=args.queue_size,
        max_in_flight_per_key=args.max_in_flight_per_key,
        media_ttl_s=args.media_ttl,
        allow_private_urls=args.allow_private_urls,
        insecure_no_auth=args.insecure_no_auth,
        public_url=args.public_url,
        lora_dir=args.lora_dir,
        allow_lora_urls=args.allow_lora_urls,
        connections=ConnectionLimits(
            **{field: getattr(args, field) for field, _, _ in CONNECTION_FLAGS.values()}
        ),
        **more,
    )


def _api(args: argparse.Namespace, scale: Scale) -> int:
    from kleinserve.api.limits import check_port_free

    check_port_free(args.host, args.port)  # before importing the server (torch, diffusers: seconds)
    from kleinserve.scale.api import serve_api

    serve_api(scale, server_settings(args), args.model)
    return 0


def _worker(args: argparse.Namespace, scale: Scale) -> int:
    from kleinserve.scale.worker import WorkerConfig, WorkerNode

    config = WorkerConfig(
        scale,
        model_options(args),
        lora_dir=args.lora_dir,
        max_batch=args.max_batch,
        threads=args.threads,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # the second signal: at once
            os._exit(1)
        print("kleinserve: draining: finishing the running batch", file=sys.stderr, flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = WorkerNode(config)
    node.start()
    print(f"kleinserve: worker {node.worker_id} ready", flush=True)
    while not stop.wait(1.0):
        if (reason := node.health()) is not None:
            print(f"kleinserve: error: {reason}", file=sys.stderr, flush=True)
            node.drain(timeout_s=0)
            return 1
    node.drain()
    # Not a normal interpreter exit: it would wait for any thread a part left behind (drain() logged it),
    # and a worker that hangs on SIGTERM holds its GPU until it is killed.
    logging.shutdown()
    os._exit(0)
