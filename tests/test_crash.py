"""Crash and shutdown, for real: `kleinserve serve` as a subprocess, killed with SIGKILL or stopped with
SIGTERM, then started again on the same data dir.

- SIGKILL with jobs done, running and queued: after a restart every job ends `Ready` with an image (the one
  that was running is run again).
- SIGTERM: new work answers 503 while the running job finishes, the process exits 0, the queue is kept in
  SQLite and runs after a restart.

`ServerProcess` is shared with tests/test_usage.py and tests/test_logging.py.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kleinserve.api.auth import ANONYMOUS, DATABASE_NAME
from kleinserve.jobs.store import JobStatus, SqliteJobStore

START_TIMEOUT_S = 60
SUBMIT = "/v1/flux-2-klein-4b"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    """`kleinserve serve` in a subprocess on a free loopback port; stderr goes to `stderr_path`."""

    model: Path
    data_dir: Path
    options: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stderr_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-stderr-{self.starts}.log"

    def start(self) -> ServerProcess:
        self.starts += 1
        command = [
            sys.executable,
            "-m",
            "kleinserve.cli",
            "serve",
            "--model",
            str(self.model),
            "--dtype",
            "float32",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *self.options,
        ]
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.stderr()}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become ready:\n{self.stderr()}")
                time.sleep(0.1)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Whatever state it is in: SIGKILL and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def server_process(tmp_path: Path, tiny_dir: Path) -> Iterator[Callable[..., ServerProcess]]:
    """`server_process(*options)`: a started ServerProcess on its own data dir, killed after the test."""
    started: list[ServerProcess] = []

    def start(*options: str, data_dir: Path | None = None) -> ServerProcess:
        running = ServerProcess(tiny_dir, data_dir or tmp_path / f"data-{len(started)}", options)
        started.append(running)
        return running.start()

    yield start
    for running in started:
        running.stop()


def submit(client: httpx.Client, seed: int, side: int = 512) -> httpx.Response:
    body = {"prompt": f"a lighthouse at dusk, seed {seed:03d}", "seed": seed, "width": side, "height": side}
    return client.post(SUBMIT, json=body)


def statuses(client: httpx.Client) -> dict[str, str]:
    answer = client.get("/v1/jobs", params={"limit": 100})
    answer.raise_for_status()
    return {job["id"]: job["status"] for job in answer.json()["data"]}


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.03)
    return value


def stored_jobs(data_dir: Path) -> dict[str, Any]:
    store = SqliteJobStore(data_dir / DATABASE_NAME)
    try:
        return {job.id: job for job in store.owned(ANONYMOUS, limit=1000)}
    finally:
        store.close()


def assert_all_ready(client: httpx.Client, ids: list[str], side: int) -> None:
    for job_id in ids:
        answer = client.get("/v1/get_result", params={"id": job_id}).json()
        assert answer["status"] == "Ready", answer
        sample = httpx.get(answer["result"]["sample"], timeout=10)
        assert sample.status_code == 200
        with Image.open(io.BytesIO(sample.content)) as image:
            assert image.size == (side, side)


def test_sigkill_with_jobs_done_running_and_queued_then_restart_finishes_all(
    server_process: Callable[..., ServerProcess],
) -> None:
    server = server_process()
    side = 512
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        ids = []
        for seed in range(20):
            answer = submit(client, seed, side)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["id"])

        def mixed() -> bool:
            counts = list(statuses(client).values())
            return all(s in counts for s in ("succeeded", "running", "queued"))

        wait_for(mixed, 30, "some jobs done, some running, some queued")
        server.signal(signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL

        at_kill = stored_jobs(server.data_dir)
        assert set(at_kill) == set(ids)
        by_status = {s: [j.id for j in at_kill.values() if j.status is s] for s in JobStatus}
        assert by_status[JobStatus.SUCCEEDED] and by_status[JobStatus.RUNNING] and by_status[JobStatus.QUEUED]

        server.start()  # same port, same data dir
        wait_for(
            lambda: all(s in ("succeeded", "failed", "cancelled") for s in statuses(client).values()),
            30,
            "every job to finish after the restart",
        )
        assert_all_ready(client, ids, side)
        after = stored_jobs(server.data_dir)
        for job_id in by_status[JobStatus.RUNNING]:
            assert after[job_id].attempts == 2  # interrupted once, run again
        for job_id in by_status[JobStatus.SUCCEEDED]:
            assert after[job_id].attempts == 1  # not run twice
    assert "was interrupted by a restart" in server.stderr()


def test_sigterm_drains_keeps_the_queue_and_exits_0(server_process: Callable[..., ServerProcess]) -> None:
    server = server_process("--max-batch", "1")
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        # One long job runs while the small ones wait behind it.
        long_job = submit(client, 0, side=1024).json()["id"]
        queued = [submit(client, seed, side=256).json()["id"] for seed in range(1, 6)]
        wait_for(lambda: statuses(client)[long_job] == "running", 20, "the long job to run")

        server.signal(signal.SIGTERM)
        refused = wait_for(
            lambda: (answer := submit(client, 99, side=256)).status_code == 503 and answer, 5, "a 503"
        )
        assert refused.headers["Retry-After"]
        assert "shutting down" in refused.json()["detail"]  # BFL's error body
        assert client.get("/readyz").status_code == 503
        assert server.wait() == 0

    jobs = stored_jobs(server.data_dir)
    assert jobs[long_job].status is JobStatus.SUCCEEDED
    assert [jobs[job_id].status for job_id in queued] == [JobStatus.QUEUED] * len(queued)
    assert len(jobs) == 1 + len(queued)  # the refused submission left no job

    server.start()
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        wait_for(
            lambda: all(statuses(client)[job_id] == "succeeded" for job_id in queued),
            20,
            "the kept queue to run after the restart",
        )
        assert_all_ready(client, queued, 256)
