"""bench/gpu.py's server measurement: a built pipeline behind kleinserve's real HTTP app, under concurrent
OpenAI-dialect clients (POST /v1/images/generations, one image each, PNG as base64 in the answer).

The app is `kleinserve.api.server.create_app` (the one `kleinserve serve` runs: job store, queue, batching
worker on its own engine thread, PNG encoding) under uvicorn with kleinserve's connection limits, in this
process on a loopback port: the pipeline was built in memory, so a `kleinserve serve` subprocess could not
load it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve import free_port, load, percentile  # bench/serve.py (the script's folder is on sys.path)

SERVER_START_S = 60.0


def warm_batches(pipeline: Any, side: int, max_batch: int) -> float:
    """One call of each batch size the server may form (a compiled pipeline compiles each shape at its first
    call: that must not land in the measured requests); returns the seconds it took."""
    from kleinserve.types import GenerateRequest

    start = time.perf_counter()
    for batch in range(1, max_batch + 1):
        requests = [
            GenerateRequest(prompt=f"server warm-up {batch}.{i}", width=side, height=side, seed=i)
            for i in range(batch)
        ]
        pipeline.generate_batch([pipeline.resolve(r) for r in requests])
    return time.perf_counter() - start


def serve_and_measure(
    pipeline: Any, args: argparse.Namespace, device: Any, sync: Callable[[], None]
) -> dict[str, Any]:
    """Serve `pipeline` at `args.serve_side` (default: the first of `args.sides`) to `args.clients` clients
    of `args.requests` requests each, the server batching up to `args.serve_max_batch`; images/s and latency
    percentiles."""
    import uvicorn

    from kleinserve.api.server import ServerSettings, create_app, http_config

    side = args.serve_side or args.sides[0]
    warm_seconds = warm_batches(pipeline, side, args.serve_max_batch)
    sync()
    with tempfile.TemporaryDirectory(prefix="kleinserve-gpu-") as data_dir:
        settings = ServerSettings(
            data_dir=Path(data_dir),
            port=free_port(),
            max_batch=args.serve_max_batch,
            max_waiting=max(64, 2 * args.clients),
            max_in_flight_per_key=max(24, 2 * args.clients),
        )
        server = uvicorn.Server(http_config(create_app(settings, pipeline), settings, log_level="warning"))
        thread = threading.Thread(target=server.run, name="gpu-bench-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + SERVER_START_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.05)
        try:
            base_url = f"http://127.0.0.1:{settings.port}"
            wall, latencies = asyncio.run(load(base_url, args.clients, args.requests, side))
        finally:
            server.should_exit = True
            thread.join(SERVER_START_S)
    return {
        "side": side,
        "clients": args.clients,
        "requests": len(latencies),
        "max_batch": args.serve_max_batch,
        "warm_batches_seconds": warm_seconds,
        "wall_seconds": wall,
        "images_per_second": len(latencies) / wall,
        "p50_seconds": statistics.median(latencies),
        "p95_seconds": percentile(latencies, 95),
    }
