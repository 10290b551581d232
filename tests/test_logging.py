"""JSON logs with request ids: the middleware and formatter in-process, then a real `kleinserve serve`
subprocess whose every stderr line is a JSON object, the request's id among them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sys
from pathlib import Path

import httpx
from fastapi import FastAPI

from kleinserve.logs import HEADER, BackgroundHandler, JsonFormatter, RequestId, request_id
from tests.test_crash import ServerProcess


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/id")
    async def current() -> dict[str, str | None]:
        return {"request_id": request_id.get()}

    app.add_middleware(RequestId)
    return app


def test_middleware_assigns_or_honours_the_request_id() -> None:
    asyncio.run(_check_middleware())


async def _check_middleware() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        fresh = await client.get("/id")
        assert fresh.headers[HEADER] == fresh.json()["request_id"]
        assert len(fresh.headers[HEADER]) == 32
        assert (await client.get("/id")).headers[HEADER] != fresh.headers[HEADER]

        honoured = await client.get("/id", headers={HEADER: "client-7.abc"})
        assert honoured.headers[HEADER] == honoured.json()["request_id"] == "client-7.abc"

        for unusable in ("has space", "x" * 200, ""):
            replaced = await client.get("/id", headers={HEADER: unusable})
            assert replaced.headers[HEADER] != unusable
            assert len(replaced.headers[HEADER]) == 32
    assert request_id.get() is None  # reset after each request


def test_formatter_writes_one_json_object() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("kleinserve.x", logging.ERROR, __file__, 1, "failed %d\nagain", (3,), None)
        record.exc_info = sys.exc_info()
    token = request_id.set("req-1")
    try:
        line = formatter.format(record)
    finally:
        request_id.reset(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "kleinserve.x"
    assert entry["message"] == "failed 3\nagain" and entry["request_id"] == "req-1"
    assert "ValueError: boom" in entry["exception"]
    assert entry["timestamp"].endswith("Z")
    assert "request_id" not in json.loads(formatter.format(logging.makeLogRecord({"msg": "no request"})))


def test_background_handler_keeps_the_request_id_and_writes_everything_on_close() -> None:
    # Formatted on another thread, where the request's context variable is not set: the id must travel
    # with the record. close() must write what is still queued (the server's last lines at exit).
    stream = io.StringIO()
    handler = BackgroundHandler(stream)
    logger = logging.getLogger("kleinserve.test-background")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = request_id.set("req-9")
        try:
            for number in range(200):
                logger.warning("line %d", number)
        finally:
            request_id.reset(token)
        logger.warning("outside any request")
    finally:
        logger.removeHandler(handler)
        handler.close()
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    messages = [entry["message"] for entry in entries]
    assert messages == [f"line {n}" for n in range(200)] + ["outside any request"]
    assert all(entry["request_id"] == "req-9" for entry in entries[:200])
    assert "request_id" not in entries[200]


def test_serve_logs_json_lines_with_the_request_id(tmp_path: Path, tiny_dir: Path) -> None:
    server = ServerProcess(tiny_dir, tmp_path / "data")
    try:
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            chosen = client.get("/v1/models", headers={HEADER: "trace-42"})
            assert chosen.headers[HEADER] == "trace-42"
            bad = client.post("/v1/flux-2-klein-4b", json={"prompt": "x", "width": 17})
            assert bad.status_code == 422
            generated = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "256x256"})
            assert generated.status_code == 200, generated.text
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.stop()

    entries = [json.loads(line) for line in server.stderr().splitlines() if line.strip()]
    assert entries
    for entry in entries:
        assert {"timestamp", "level", "logger", "message"} <= entry.keys()
    by_id = {entry.get("request_id"): entry for entry in entries if entry["logger"] == "uvicorn.access"}
    assert by_id["trace-42"]["path"] == "/v1/models" and by_id["trace-42"]["status"] == 200
    assert by_id[bad.headers[HEADER]]["status"] == 422
    assert by_id[generated.headers[HEADER]]["path"] == "/v1/images/generations"
    assert any(entry["message"].startswith("draining") for entry in entries)
