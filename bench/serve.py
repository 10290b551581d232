"""Server benchmark: throughput and latency of `kleinserve serve` under concurrent clients, with and without
batching, and the HTTP server's overhead over a direct engine call.

    python bench/serve.py [--model tiny-random] [--clients 16] [--requests 4] [--size 256] [--single 40]

For each `--max-batch` (4, then 1, `--rounds` times: this machine's speed drifts by up to 2x, so the two
alternate and the median of each is compared) a `kleinserve serve` subprocess is started on a fresh data dir;
`--clients` concurrent clients each send `--requests` OpenAI `POST /v1/images/generations` (one image of SIZE
x SIZE, distinct prompts and seeds) one after the other. Reported: images/s (all images / wall time) and
p50/p95/p99 request latency.

Overhead: `--single` sequential requests to the idle max-batch-1 server. For each, what serving added: its
latency minus its own job's engine time (`usage.engine_seconds` of the job, read back through
`GET /v1/jobs/{id}`) minus the PNG encoding of its image (timed here on the returned image), i.e. HTTP, JSON,
the job store, the queue hand-offs, storage, base64; the target is on the median. Each request is followed by
the same work done directly in this process (`pipeline.generate` + PNG encoding), printed for comparison but
not subtracted: two processes' engine speeds differ here by +-50 ms for tens of minutes (a process's first
hundreds of calls get faster and faster), far more than the overhead being measured.

Targets: batching (max-batch 4) >= 1.5x the images/s of max-batch 1 at 16 clients; overhead <= 5 ms p50.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BATCHING_TARGET = 1.5
OVERHEAD_TARGET_MS = 5.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    def __init__(self, args: argparse.Namespace, max_batch: int, data_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "kleinserve.cli",
            "serve",
            "--model",
            args.model,
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir),
            "--max-batch",
            str(max_batch),
            "--queue-size",
            str(max(64, 2 * args.clients)),
            "--max-in-flight-per-key",
            str(max(24, 2 * args.clients)),
        ]
        if args.dtype:
            command += ["--dtype", args.dtype]
        self.log = (data_dir.parent / f"server-{max_batch}.log").open("wb")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def body(index: int, size: int) -> dict[str, Any]:
    prompt = f"a lighthouse, study {index:04d}"
    return {"model": "flux-2-klein-4b", "prompt": prompt, "size": f"{size}x{size}", "seed": index}


async def load(base_url: str, clients: int, requests: int, size: int) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) of `clients` clients sending `requests` requests each."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def one_client(number: int) -> None:
            for i in range(requests):
                start = time.perf_counter()
                answer = await client.post("/v1/images/generations", json=body(number * 1000 + i, size))
                answer.raise_for_status()
                latencies.append(time.perf_counter() - start)

        # Warm-up: one request (first-call costs in the server).
        (await client.post("/v1/images/generations", json=body(999_999, size))).raise_for_status()
        start = time.perf_counter()
        await asyncio.gather(*(one_client(n) for n in range(clients)))
        return time.perf_counter() - start, latencies


@dataclass
class Overhead:
    """Per request of the overhead phase, in seconds."""

    latency: list[float] = field(default_factory=list)  # HTTP, as the client sees it
    engine: list[float] = field(default_factory=list)  # the job's own engine time (usage.engine_seconds)
    encoding: list[float] = field(default_factory=list)  # PNG encoding of the returned image, here
    direct: list[float] = field(default_factory=list)  # pipeline.generate + PNG encoding in this process

    @property
    def serving(self) -> list[float]:
        """What serving adds to each request: its latency minus its own engine and encoding time."""
        return [a - b - c for a, b, c in zip(self.latency, self.engine, self.encoding, strict=True)]


def overhead(args: argparse.Namespace, base_url: str) -> Overhead:
    """`--single` requests to the idle server, each followed by the same work done directly in this
    process (`pipeline.generate` + PNG encoding of its image: the same bytes); module docstring."""
    from PIL import Image

    from kleinserve.engine import load_pipeline
    from kleinserve.types import GenerateRequest, encode_image

    pipeline = load_pipeline(args.model, dtype=args.dtype)

    def direct(index: int) -> None:
        wire = body(index, args.size)
        request = GenerateRequest(prompt=wire["prompt"], width=args.size, height=args.size, seed=wire["seed"])
        encode_image(pipeline.generate(request).images[0].image)

    for index in range(args.single + args.clients * args.requests // 2):  # warm, as the server is
        direct(900_000 + index)
    measured = Overhead()
    with httpx.Client(base_url=base_url, timeout=600) as client:
        client.post("/v1/images/generations", json=body(-1 % 10**6, args.size)).raise_for_status()
        for i in range(args.single):
            start = time.perf_counter()
            answer = client.post("/v1/images/generations", json=body(500_000 + i, args.size))
            measured.latency.append(time.perf_counter() - start)
            answer.raise_for_status()
            result = answer.json()
            job = client.get(f"/v1/jobs/{result['id']}").raise_for_status().json()
            measured.engine.append(job["usage"]["engine_seconds"])
            image = Image.open(io.BytesIO(base64.b64decode(result["data"][0]["b64_json"])))
            start = time.perf_counter()
            encode_image(image)
            measured.encoding.append(time.perf_counter() - start)
            start = time.perf_counter()
            direct(600_000 + i)  # another prompt: neither side hits a prompt cache
            measured.direct.append(time.perf_counter() - start)
    return measured


def describe(latencies: list[float]) -> str:
    return " ".join(f"p{q}={percentile(latencies, q) * 1000:.0f}ms" for q in (50, 95, 99))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--single", type=int, default=40, help="request pairs (HTTP, direct) for the overhead"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of max-batch 4 and 1")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and server logs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="kleinserve-bench-"))
    throughput: dict[int, list[float]] = {4: [], 1: []}
    measured = Overhead()
    try:
        for round_number in range(args.rounds):
            for max_batch in (4, 1):
                server = Server(args, max_batch, work / f"data-{max_batch}-{round_number}")
                try:
                    wall, latencies = asyncio.run(
                        load(server.base_url, args.clients, args.requests, args.size)
                    )
                    if max_batch == 1 and round_number == args.rounds - 1:
                        measured = overhead(args, server.base_url)
                finally:
                    server.stop()
                images = args.clients * args.requests
                throughput[max_batch].append(images / wall)
                print(
                    f"round {round_number + 1}, max-batch {max_batch}: {args.clients} clients x "
                    f"{args.requests} requests, {args.size}x{args.size}: {images} images in {wall:.2f} s = "
                    f"{images / wall:.2f} images/s; {describe(latencies)}",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    speedup = statistics.median(throughput[4]) / statistics.median(throughput[1])
    overhead_ms = statistics.median(measured.serving) * 1000
    print(
        f"single request through HTTP ({args.single}, idle max-batch-1 server): {describe(measured.latency)}"
    )
    print(
        f"  its job's engine time: {describe(measured.engine)}; "
        f"PNG encoding of its image: {describe(measured.encoding)}"
    )
    print(f"pipeline.generate + PNG encoding in this process, alternating: {describe(measured.direct)}")
    verdict = "met" if speedup >= BATCHING_TARGET else "NOT met"
    print(
        f"batching speed-up: {speedup:.2f}x images/s, medians of {args.rounds} rounds "
        f"(target >= {BATCHING_TARGET}x: {verdict})"
    )
    verdict = "met" if overhead_ms <= OVERHEAD_TARGET_MS else "NOT met"
    print(
        f"server overhead: {overhead_ms:.1f} ms p50 of latency - engine - encoding "
        f"(target <= {OVERHEAD_TARGET_MS:.0f} ms: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
