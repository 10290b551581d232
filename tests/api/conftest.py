"""A real kleinserve HTTP server on a free loopback port, serving the tiny model.

`server` is shared by the whole session (open, no keys); `start_server(**settings)` starts another one with
its own data dir and settings (keys, queue size, body limit ...) and stops it after the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from kleinserve.api.server import ServerSettings, create_app, http_config
from kleinserve.engine import Pipeline, load_pipeline


@dataclass
class RunningServer:
    base_url: str
    settings: ServerSettings
    pipeline: Pipeline
    _server: uvicorn.Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_in_thread(settings: ServerSettings, pipeline: Pipeline) -> RunningServer:
    settings = replace(settings, port=_free_port())
    server = uvicorn.Server(http_config(create_app(settings, pipeline), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://{settings.host}:{settings.port}", settings, pipeline, server, thread)


@pytest.fixture(scope="session")
def server_pipeline(tiny_dir: Path) -> Pipeline:
    """The server's own pipeline (the engine is single-threaded; tests keep theirs)."""
    return load_pipeline(str(tiny_dir), dtype="float32")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, server_pipeline: Pipeline) -> Iterator[RunningServer]:
    running = serve_in_thread(
        ServerSettings(data_dir=tmp_path_factory.mktemp("server-data")), server_pipeline
    )
    yield running
    running.stop()


@pytest.fixture
def start_server(tmp_path: Path, server_pipeline: Pipeline) -> Iterator[Callable[..., RunningServer]]:
    """Start a server with its own data dir; `start_server(max_waiting=1, ...)` overrides settings."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        settings = ServerSettings(data_dir=tmp_path / f"data-{len(started)}", **overrides)
        running = serve_in_thread(settings, server_pipeline)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


# --- the Vercel AI SDK under Node: tests/node/generate.mjs, versions locked in its package-lock.json ---

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
SDK_SCRIPT = NODE_DIR / "generate.mjs"
MIN_NODE_MAJOR = 20
SDK_PACKAGES = ("ai", "@ai-sdk/openai-compatible", "@ai-sdk/gateway", "@ai-sdk/black-forest-labs")


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, after checking that it and the locked SDK packages are there (fails, never skips)."""
    path = shutil.which("node")
    if path is None:
        pytest.fail(
            f"Node.js >= {MIN_NODE_MAJOR} is required for the Vercel AI SDK tests and `node` is not on PATH: "
            "install Node.js and npm, then run `make node-setup`"
        )
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        pytest.fail(f"Node.js >= {MIN_NODE_MAJOR} is required for the Vercel AI SDK tests; found {version}")
    for package in SDK_PACKAGES:
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(f"the npm package {package} is not installed in {NODE_DIR}: run `make node-setup`")
    return path


def run_sdk(
    node: str, provider: str, base_url: str, *calls: dict[str, Any], api_key: str = "unused"
) -> list[dict[str, Any]]:
    """Run generate.mjs (`provider`: openai-compatible | gateway | bfl) with one JSON argument per
    generateImage call; returns one result per call."""
    command = [node, str(SDK_SCRIPT), provider, base_url, *(json.dumps(call) for call in calls)]
    env = {**os.environ, "KLEINSERVE_API_KEY": api_key}
    done = subprocess.run(
        command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (
        f"node exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    )
    results = json.loads(done.stdout)["results"]
    assert len(results) == len(calls)
    return results
