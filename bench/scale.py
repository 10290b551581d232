"""Scale-out benchmark: `kleinserve api` + `kleinserve worker` processes on PostgreSQL and S3 (issue 16),
with one worker and two, and against the one-box `kleinserve serve`.

    python bench/scale.py [--jobs 48] [--size 512] [--rounds 3] [--latency-jobs 40] [--single 40]

Everything runs here: a private PostgreSQL cluster (tests/postgres.py), moto's S3 server in this process
(tests/s3.py), one API process and `tiny-random` workers with one torch thread each (OMP_NUM_THREADS=1,
`--threads 1 --max-batch 4`), as the multi-process tests run them.

1. Throughput: `--jobs` BFL async jobs (`POST /v1/flux-2-klein-4b`, SIZE x SIZE, distinct prompts and
   seeds) are submitted at once (8 connections); the clock runs from the first submit to the last job's
   `finished` in its row (read with psycopg every 0.1 s; the worker sets it once the image is stored).
   images/s = jobs / that. One worker, then two (the second launched and warmed up with a burst of jobs,
   then drained away by SIGTERM), `--rounds` times: this machine's speed drifts by up to 2x, so the two
   alternate and their medians are compared. Target: 2 workers >= 1.8x the images/s of 1 (2 cores, one
   engine thread each; the API, PostgreSQL and moto share those cores). SIZE is 512 by default: at 256 the
   ~12 ms of CPU an image costs outside the workers (API, PostgreSQL, moto: on other machines in a real
   deployment) is a tenth of a worker's image, and the ratio then measured this box (1.62x; README).
2. Claim-to-start latency: `--latency-jobs` 64x64 jobs one after another on the idle workers (the next is
   submitted 0.1 s after the last ended). Per job, `started - created` of its row (the API stamps `created`
   before its insert commits, the worker `started` in its claim) and what a client sees: from sending the
   submit until `GET /v1/jobs/{id}/events`, opened right after the submit's answer, says `running`. An idle
   worker waits on LISTEN `kleinserve_queued`, so both should be milliseconds, not its 0.5 s fallback poll.
3. Overhead against one box: `--single` synchronous OpenAI `POST /v1/images/generations` (one SIZE x SIZE
   image), alternating between `kleinserve serve --max-batch 1` and the API with its one remaining worker,
   both idle; each request's latency through `http.client` minus its job's own engine time
   (`usage.engine_seconds` from `GET /v1/jobs/{id}`), taken by bench/serve.py's `Probe`. The difference of
   the two medians is what scaling out adds to a request: the insert and NOTIFY, the worker's claim, the
   result's upload to S3 and the API's read of it back, the end event through PostgreSQL. (serve.py's
   overhead also subtracts the PNG encoding, which a worker does out of the API's sight; both sides here
   encode the same image once.) moto is a Python server on these same cores, slower than a real S3.

Each throughput burst also reports the CPU milliseconds per image of each part (workers, API, PostgreSQL,
this process: moto and the client) and of "others", the rest of the machine's busy time: on a 2-core box
shared with other work, the figures mean something only when "others" is near 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg
from machine import cpu_line  # bench/machine.py and bench/serve.py (the script's folder is on sys.path)
from psycopg.rows import dict_row
from serve import Probe, Requests, Server, body, describe, free_port

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository root: the tests' helpers
from tests.postgres import PostgresServer  # noqa: E402
from tests.s3 import moto_server, new_bucket  # noqa: E402

SPEEDUP_TARGET = 1.8
SUBMIT = "/v1/flux-2-klein-4b"
START_TIMEOUT_S = 180.0  # a worker imports torch and loads the model, on cores busy with others
JOB_TIMEOUT_S = 600.0
POLL_S = 0.1
LATENCY_GAP_S = 0.1  # between one latency job's end and the next submit: the workers are idle again
LATENCY_SIZE = 64
SUBMITTERS = 8  # concurrent connections submitting a burst
WARM_UP_JOBS = 16  # a new worker's first burst, not measured
TERMINAL = ("succeeded", "failed", "cancelled")
DISTURBED = 0.05  # of all CPU time, used by processes not ours: the figures are not this code's


@dataclass
class Process:
    """A kleinserve subprocess, its stdout and stderr in `log`."""

    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def launch(cls, command: list[str], env: dict[str, str], log: Path, ready: str) -> Process:
        """Start `command` and return once its output matches the regular expression `ready`."""
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        launched, deadline = cls(process, log), time.monotonic() + START_TIMEOUT_S
        while not re.search(ready, log.read_text(errors="replace")):
            if process.poll() is not None or time.monotonic() > deadline:
                launched.stop()
                raise SystemExit(f"{command[3]} was not ready; see {log}")
            time.sleep(POLL_S)
        return launched

    def stop(self) -> None:
        """SIGTERM (drain) and reap; SIGKILL after a minute."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class ScaledOut:
    """One `kleinserve api` and its `kleinserve worker`s on one database and one bucket; logs under `root`."""

    database_url: str
    media_url: str
    env: dict[str, str]
    root: Path
    model: str
    postgres_pid: int  # the postmaster: its children are the connections' backends
    in_flight: int  # the API's --queue-size and --max-in-flight-per-key: a whole burst is accepted
    api: Process | None = None
    base_url: str = ""
    workers: list[Process] = field(default_factory=list)
    launched: int = 0

    def _command(self, kind: str, name: str, *options: str) -> list[str]:
        shared = ["--database-url", self.database_url, "--media-url", self.media_url, "--model", self.model]
        data = ["--data-dir", str(self.root / name)]
        return [sys.executable, "-m", "kleinserve.cli", kind, *shared, *data, *options]

    def start_api(self) -> None:
        port = free_port()
        limits = ["--queue-size", str(self.in_flight), "--max-in-flight-per-key", str(self.in_flight)]
        command = self._command("api", "api", "--port", str(port), *limits)
        ready = rf"kleinserve: serving .* at http://127\.0\.0\.1:{port}/"
        self.api = Process.launch(command, self.env, self.root / "api.log", ready)
        self.base_url = f"http://127.0.0.1:{port}"

    def add_worker(self) -> None:
        name, self.launched = f"worker-{self.launched}", self.launched + 1
        options = ("--dtype", "float32", "--threads", "1", "--max-batch", "4")
        command = self._command("worker", name, *options)
        self.workers.append(Process.launch(command, self.env, self.root / f"{name}.log", r"worker \S+ ready"))

    def drain_worker(self) -> None:
        """SIGTERM the newest worker: it finishes its batch (none: the queue is empty) and exits."""
        self.workers.pop().stop()

    def stop(self) -> None:
        for process in [*self.workers, *([self.api] if self.api else [])]:
            process.stop()

    def parts(self) -> dict[str, list[int]]:
        """The process ids of each part: workers, API, PostgreSQL, and this process (moto, the client)."""
        postgres = psutil.Process(self.postgres_pid)
        return {
            "workers": [worker.process.pid for worker in self.workers],
            "API": [self.api.process.pid] if self.api else [],
            "PostgreSQL": [postgres.pid, *(child.pid for child in postgres.children(recursive=True))],
            "moto + client": [os.getpid()],
        }


def cpu_seconds(parts: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """User + system CPU seconds so far of each part's processes (one that has exited is left out), and
    under "machine" (pid 0) the busy time of all cores, as the kernel counts it."""
    seconds: dict[str, dict[int, float]] = {part: {} for part in parts}
    for part, pids in parts.items():
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                used = psutil.Process(pid).cpu_times()
                seconds[part][pid] = used.user + used.system
    machine = psutil.cpu_times()
    seconds["machine"] = {0: sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)}
    return seconds


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds each part used between two `cpu_seconds`; "others" is the rest of the machine's busy
    time: processes not ours, whose load disturbs the measurement."""
    used = {part: sum(t - before[part].get(pid, 0.0) for pid, t in after[part].items()) for part in after}
    used["others"] = used.pop("machine") - sum(used.values())
    return used


def bfl_body(index: int, size: int) -> dict[str, Any]:
    return {"prompt": f"a harbour at dusk, study {index:05d}", "width": size, "height": size, "seed": index}


async def submit_burst(base_url: str, first: int, count: int, size: int) -> tuple[float, list[str]]:
    """(Unix time of the first submit, job ids) of `count` BFL jobs submitted at once."""
    limits = httpx.Limits(max_connections=SUBMITTERS, max_keepalive_connections=SUBMITTERS)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        start = time.time()
        answers = await asyncio.gather(
            *(client.post(SUBMIT, json=bfl_body(first + i, size)) for i in range(count))
        )
    return start, [answer.raise_for_status().json()["id"] for answer in answers]


def finished_rows(database_url: str, ids: list[str]) -> list[dict[str, Any]]:
    """The rows (status, created, started, finished: Unix seconds) of `ids` once every one has ended;
    SystemExit if one did not succeed or JOB_TIMEOUT_S pass."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as db:
        while time.monotonic() < deadline:
            query = "SELECT id, status, error, created, started, finished FROM jobs WHERE id = ANY(%s)"
            rows = db.execute(query, (ids,)).fetchall()
            if len(rows) == len(ids) and all(row["status"] in TERMINAL for row in rows):
                if failed := [row for row in rows if row["status"] != "succeeded"]:
                    raise SystemExit(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
                return rows
            time.sleep(POLL_S)
    raise SystemExit(f"jobs still unfinished after {JOB_TIMEOUT_S:.0f} s")


def images_per_second(
    cluster: ScaledOut, first: int, count: int, size: int
) -> tuple[float, dict[str, float]]:
    """`count` jobs submitted at once, divided by the time from the first submit to the last one finished;
    and the CPU milliseconds per image each part used meanwhile (`cpu_used`)."""
    before = cpu_seconds(cluster.parts())
    start, ids = asyncio.run(submit_burst(cluster.base_url, first, count, size))
    rate = count / (max(row["finished"] for row in finished_rows(cluster.database_url, ids)) - start)
    used = cpu_used(before, cpu_seconds(cluster.parts()))
    return rate, {part: seconds * 1000 / count for part, seconds in used.items()}


def describe_cpu(milliseconds: dict[str, float]) -> str:
    return ", ".join(f"{part} {value:.0f}" for part, value in milliseconds.items())


@dataclass
class Throughput:
    """Per number of workers, each round's images/s and CPU milliseconds per image of each part."""

    rates: dict[int, list[float]] = field(default_factory=lambda: {1: [], 2: []})
    cpu: dict[int, list[dict[str, float]]] = field(default_factory=lambda: {1: [], 2: []})

    def median_cpu(self, workers: int) -> dict[str, float]:
        rounds = self.cpu[workers]
        return {part: statistics.median(used[part] for used in rounds) for part in rounds[0]}


def throughput(cluster: ScaledOut, args: argparse.Namespace) -> Throughput:
    """Each round with 1 and with 2 workers (module docstring, 1); one worker is left running."""
    measured = Throughput()
    submitted = 0  # jobs so far: each gets its own prompt and seed
    for round_number in range(args.rounds):
        for workers in (1, 2):
            while len(cluster.workers) < workers:
                cluster.add_worker()
                # Each batch size's first run pays one-time costs (oneDNN primitives, allocator growth).
                images_per_second(cluster, 900_000 + submitted, WARM_UP_JOBS, args.size)
                submitted += WARM_UP_JOBS
            rate, cpu = images_per_second(cluster, submitted, args.jobs, args.size)
            submitted += args.jobs
            measured.rates[workers].append(rate)
            measured.cpu[workers].append(cpu)
            print(
                f"round {round_number + 1}, {workers} worker(s): {args.jobs} jobs {args.size}x{args.size}: "
                f"{rate:.2f} images/s; CPU ms per image: {describe_cpu(cpu)}",
                flush=True,
            )
        cluster.drain_worker()
    return measured


@dataclass
class Latency:
    """Claim-to-start of jobs submitted one at a time, in seconds."""

    row: list[float] = field(default_factory=list)  # started - created, from the job's row
    client: list[float] = field(default_factory=list)  # submit sent -> `running` seen on the event stream


def claim_latency(cluster: ScaledOut, jobs: int) -> Latency:
    """`jobs` 64x64 jobs one after another on the idle workers (module docstring, 2)."""
    measured, ids = Latency(), []
    with httpx.Client(base_url=cluster.base_url, timeout=120) as client:
        for index in range(jobs):
            time.sleep(LATENCY_GAP_S)
            start = time.perf_counter()
            job_id = client.post(SUBMIT, json=bfl_body(800_000 + index, LATENCY_SIZE)).raise_for_status()
            ids.append(job_id.json()["id"])
            seen = None
            with client.stream("GET", f"/v1/jobs/{ids[-1]}/events") as events:
                for line in events.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    kind = orjson.loads(line.removeprefix("data:"))["type"]
                    if seen is None and kind != "queued":  # running, or already a step or the end
                        seen = time.perf_counter() - start
                    if kind in TERMINAL:
                        break
            assert seen is not None, f"job {ids[-1]} ended without an event"
            measured.client.append(seen)
    rows = {row["id"]: row for row in finished_rows(cluster.database_url, ids)}
    measured.row = [rows[job_id]["started"] - rows[job_id]["created"] for job_id in ids]
    return measured


def one_box_against_scaled(args: argparse.Namespace, cluster: ScaledOut) -> tuple[Requests, Requests]:
    """(one box, scaled out): `--single` synchronous OpenAI requests to each, alternating (module
    docstring, 3). The one-box server starts here and is stopped before returning."""
    settings = argparse.Namespace(model=args.model, dtype="float32", clients=1)
    server = Server(settings, 1, cluster.root / "serve-data")
    probes = (Probe(server.base_url), Probe(cluster.base_url))
    measured = (Requests(), Requests())
    try:
        for index in range(-4, args.single):  # the first four of each: warm-up
            for first, probe, requests in zip((600_000, 700_000), probes, measured, strict=True):
                timings = probe.request(body(first + index, args.size), lean=True)  # distinct prompts
                if index >= 0:
                    requests.add(timings)
    finally:
        for probe in probes:
            probe.close()
        server.stop()
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--jobs", type=int, default=48, help="jobs per throughput burst")
    parser.add_argument(
        "--size", type=int, default=512, help="image side of the throughput and overhead jobs"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternations of 1 and 2 workers")
    parser.add_argument("--latency-jobs", type=int, default=40)
    parser.add_argument("--single", type=int, default=40, help="overhead requests to each server")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and process logs")
    args = parser.parse_args()
    print(f"machine: {cpu_line()}", flush=True)
    # Inherited by every process started here, the one-box server too: one engine thread each.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    root = Path(tempfile.mkdtemp(prefix="kleinserve-scale-"))
    postgres = PostgresServer.start()
    try:
        with moto_server() as endpoint:
            media = new_bucket(endpoint)
            postmaster = int((postgres.root / "data" / "postmaster.pid").read_text().split()[0])
            env = {**os.environ, **media.env}
            database = postgres.new_database()
            cluster = ScaledOut(database, media.url, env, root, args.model, postmaster, 4 * args.jobs)
            try:
                cluster.start_api()
                measured = throughput(cluster, args)
                latency = claim_latency(cluster, args.latency_jobs)
                one_box, scaled = one_box_against_scaled(args, cluster)
            finally:
                cluster.stop()
    finally:
        postgres.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(args, measured, latency, one_box, scaled)
    return 0


def report(
    args: argparse.Namespace, measured: Throughput, latency: Latency, one_box: Requests, scaled: Requests
) -> None:
    one, two = (statistics.median(measured.rates[workers]) for workers in (1, 2))
    verdict = "met" if two / one >= SPEEDUP_TARGET else "NOT met"
    print(
        f"throughput, medians of {args.rounds} rounds: 1 worker {one:.2f}, 2 workers {two:.2f} images/s: "
        f"{two / one:.2f}x (target >= {SPEEDUP_TARGET}x: {verdict})"
    )
    for workers in (1, 2):
        cpu = measured.median_cpu(workers)
        disturbed = cpu["others"] > DISTURBED * sum(cpu.values())
        warning = f" (others over {DISTURBED:.0%}: disturbed, run again)" if disturbed else ""
        print(f"  CPU ms per image, {workers} worker(s): {describe_cpu(cpu)}{warning}")
    print(f"claim-to-start, {args.latency_jobs} jobs one at a time on idle workers:")
    print(f"  started - created (rows): {describe(latency.row)}")
    print(f"  submit sent -> running on the event stream (client): {describe(latency.client)}")
    print(
        f"overhead, {args.single} synchronous OpenAI requests {args.size}x{args.size} to each, alternating:"
    )
    medians = []
    for name, requests in (("kleinserve serve", one_box), ("api + 1 worker", scaled)):
        added = [seconds - engine for seconds, engine in zip(requests.latency, requests.engine, strict=True)]
        medians.append(statistics.median(added))
        print(
            f"  {name}: latency {describe(requests.latency)}; engine {describe(requests.engine)}; "
            f"latency - engine {describe(added)}"
        )
    print(f"  one box's PNG encoding (its /metrics): {describe(one_box.encoding)}")
    print(f"scaling out adds {(medians[1] - medians[0]) * 1000:.1f} ms p50 to a synchronous request")


if __name__ == "__main__":
    sys.exit(main())
