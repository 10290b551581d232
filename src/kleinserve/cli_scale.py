"""`kleinserve api` and `kleinserve worker`: the scaled-out processes' commands (their parts:
kleinserve/scale.py).

Both take `--database-url` (PostgreSQL: jobs, keys, usage) and `--media-url` (`s3://bucket/prefix`,
credentials from the AWS_* variables; without it the data dir, which only works when every process shares that
folder). SIGTERM/SIGINT drains either: the API finishes its open requests, the worker its running batch; a
second signal exits at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from kleinserve.cli import server_settings
from kleinserve.logs import configure

if TYPE_CHECKING:  # the scale-out modules load psycopg and torch: only when the command runs
    from kleinserve.scale import Scale


def run(args: argparse.Namespace) -> int:
    configure()  # JSON lines on stderr, model loading included
    from kleinserve.scale import Scale

    scale = Scale(args.database_url, args.media_url, args.data_dir, args.lease_seconds)
    if args.command == "api":
        return _api(args, scale)
    return _worker(args, scale)


def _api(args: argparse.Namespace, scale: Scale) -> int:
    from kleinserve.api.limits import check_port_free

    check_port_free(args.host, args.port)  # before importing the server (torch, diffusers: seconds)
    from kleinserve.scale import serve_api

    serve_api(scale, server_settings(args), args.model)
    return 0


def _worker(args: argparse.Namespace, scale: Scale) -> int:
    from kleinserve.scale import WorkerConfig, WorkerNode

    config = WorkerConfig(
        scale,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        offload=args.offload,
        memory_budget_gib=args.memory_budget,
        components=args.components,
        download=args.download,
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
    return 0
