"""Real `kleinserve api` and `kleinserve worker` subprocesses for the multi-process tests.

    cluster = Cluster(database_url, media_url, model_dir, tmp_path, env=s3_env)
    cluster.top_up(apis=2, workers=2)   # launched at once (they load in parallel), ready
    a, b = cluster.apis                 # each on a free loopback port, with its own data dir
    cluster.workers[0].kill()           # SIGKILL, reaped
    cluster.top_up(apis=2, workers=2)   # a new worker in its place
    cluster.stop()                      # every process still alive: SIGKILL, reaped

Each process runs with one torch thread (OMP_NUM_THREADS=1: two workers and two APIs share 2 cores) and
unbuffered output, into one log file for stdout and stderr; `Cluster.report()` is every log, for a failing
test's output.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 90.0  # a worker imports torch and loads the model; two at once on 2 cores
STOP_TIMEOUT_S = 30.0
LEASE_S = 3  # a killed or stopped worker's jobs come back after this (the default, 20 s, is for production)
POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class KleinProcess:
    """One kleinserve subprocess. `wait_ready` returns once `ready` matched its output (an API's listening
    line, a worker's warmed-up line); `match` then holds that match. The log is `log_path` (stdout and stderr
    together, appended to by every start)."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    ready: re.Pattern[str]
    process: subprocess.Popen[bytes] | None = None
    match: re.Match[str] | None = None
    skip: int = 0  # characters of the log written before the current run

    def launch(self) -> None:
        """Start the process (again, after it exited); returns at once."""
        assert not self.alive(), f"{self.name} is running"
        self.skip = len(self.output())  # a restart's ready line is after the previous run's
        self.match = None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait for the ready line; RuntimeError if the process exits first or `timeout` s pass."""
        assert self.process is not None, f"{self.name} was never launched"
        deadline = time.monotonic() + timeout
        while not (match := self.ready.search(self.output()[self.skip :])):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s")
            time.sleep(POLL_S)
        self.match = match

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None, f"{self.name} was never started"
        self.process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """The exit status (negative: killed by that signal); subprocess.TimeoutExpired past `timeout` s."""
        assert self.process is not None, f"{self.name} was never started"
        return self.process.wait(timeout)

    def kill(self) -> int:
        """SIGKILL (a SIGSTOPped process dies too) and reap; the exit status."""
        self.signal(signal.SIGKILL)
        return self.wait()

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (drain), then wait for the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def stop(self) -> None:
        """Whatever state it is in: SIGKILL if still alive, and reap."""
        if self.alive():
            self.kill()


@dataclass
class ApiProcess(KleinProcess):
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class WorkerProcess(KleinProcess):
    @property
    def worker_id(self) -> str:
        """The id the worker announced (`kleinserve: worker <id> ready`), as its leased rows name it."""
        assert self.match is not None, f"{self.name} is not ready"
        return self.match["id"]


@dataclass
class Cluster:
    """The kleinserve processes on one database and one media URL (`--media-url`); `env` adds to os.environ
    (the AWS_* variables of the S3 endpoint). Processes are only ever added: a killed one stays listed, with
    its log, and `top_up` launches replacements."""

    database_url: str
    media_url: str
    model: Path
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    api_options: tuple[str, ...] = ()  # more flags of every `kleinserve api` / `kleinserve worker`
    worker_options: tuple[str, ...] = ()
    processes: list[KleinProcess] = field(default_factory=list)

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.env,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }

    def _command(self, kind: str, name: str, options: tuple[str, ...]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kleinserve.cli",
            kind,
            "--database-url",
            self.database_url,
            "--media-url",
            self.media_url,
            "--model",
            str(self.model),
            "--data-dir",
            str(self.root / name),
            "--lease-seconds",
            str(LEASE_S),
            *options,
        ]

    def _name(self, kind: str) -> str:
        return f"{kind}-{sum(process.name.startswith(kind) for process in self.processes)}"

    def api(self) -> ApiProcess:
        """A launched `kleinserve api` on a free port, allowed to call loopback webhooks."""
        name, port = self._name("api"), free_port()
        command = self._command("api", name, ("--port", str(port), "--allow-private-urls", *self.api_options))
        ready = re.compile(rf"kleinserve: serving .* at http://127\.0\.0\.1:{port}/")
        process = ApiProcess(name, command, self._env(), self.root / f"{name}.log", ready, port=port)
        self.processes.append(process)
        process.launch()
        return process

    def worker(self) -> WorkerProcess:
        """A launched `kleinserve worker` with one engine thread and batches of up to 4 images (ready once
        warmed up)."""
        name = self._name("worker")
        flags = ("--dtype", "float32", "--threads", "1", "--max-batch", "4", *self.worker_options)
        command = self._command("worker", name, flags)
        ready = re.compile(r"kleinserve: worker (?P<id>\S+) ready")
        process = WorkerProcess(name, command, self._env(), self.root / f"{name}.log", ready)
        self.processes.append(process)
        process.launch()
        return process

    @property
    def apis(self) -> list[ApiProcess]:
        """The API processes alive, oldest first."""
        return [p for p in self.processes if isinstance(p, ApiProcess) and p.alive()]

    @property
    def workers(self) -> list[WorkerProcess]:
        """The worker processes alive, oldest first."""
        return [p for p in self.processes if isinstance(p, WorkerProcess) and p.alive()]

    def top_up(self, apis: int, workers: int, timeout: float = START_TIMEOUT_S) -> None:
        """Launch APIs and workers until `apis` and `workers` are alive, and wait until all of them are ready
        (they start in parallel)."""
        launched: list[KleinProcess] = [self.api() for _ in range(apis - len(self.apis))]
        launched += [self.worker() for _ in range(workers - len(self.workers))]
        deadline = time.monotonic() + timeout
        for process in launched:
            process.wait_ready(max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """SIGKILL and reap every process still alive (a stopped one too); never raises for one that hangs."""
        for process in self.processes:
            try:
                process.stop()
            except subprocess.TimeoutExpired:
                pass  # reported by report(); the next process must still be reaped

    def log_sizes(self) -> dict[str, int]:
        """How much each process has logged so far (for `report(since=...)`)."""
        return {process.name: len(process.output()) for process in self.processes}

    def report(self, since: dict[str, int] | None = None) -> str:
        """Every process's exit status and log (what it logged after `since`), for a failing test's output."""
        parts = []
        for process in self.processes:
            status = process.process.poll() if process.process else "never started"
            log = process.output()[(since or {}).get(process.name, 0) :]
            parts.append(f"===== {process.name} (exit {status}) =====\n{log}")
        return "\n".join(parts)
