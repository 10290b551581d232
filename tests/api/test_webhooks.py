"""Webhooks against a live kleinserve (wire-formats.md section 4.6): a BFL submit with webhook_url and
webhook_secret gets one signed POST on completion at a loopback receiver; failed deliveries are retried;
without --allow-private-urls a loopback target is refused. The outcome is on the job (`webhook_status`).
Deliveries are durable: one cut by a restart, or owed by a job that crash recovery failed, is sent by the next
server on the data dir, in the format the job records (a job stored before formats were recorded: BFL's).
(Receivers that misbehave: test_webhook_receivers.py.)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kleinserve.api.auth import DATABASE_NAME
from kleinserve.api.server import ServerSettings
from kleinserve.engine import Pipeline
from kleinserve.jobs import webhooks
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.record import JobImage, JobResult
from kleinserve.jobs.store import MAX_ATTEMPTS, Job, JobStatus, SqliteJobStore, new_job_id
from kleinserve.media import MEDIA_TTL_S
from kleinserve.outbound import OutboundPolicy
from tests.api.conftest import RunningServer, serve_in_thread
from tests.conftest import job_params

SUBMIT = "/v1/flux-2-klein-4b"
SECRET = "s3cret-for-tests"


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A loopback webhook receiver; answers with `statuses` in turn (then 200) and records every POST."""

    url: str
    statuses: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)

    def wait(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} deliveries arrived"
            time.sleep(0.02)
        return self.deliveries


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = state.statuses.pop(0) if state.statuses else 200
            state.deliveries.append(Delivery(self.path, dict(self.headers.items()), body))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def short_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries after 50 ms instead of 1, 5 and 30 s (the sender reads the module's delays at delivery)."""
    monkeypatch.setattr(webhooks, "RETRY_DELAYS_S", (0.05, 0.05, 0.05))


def submit(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post(SUBMIT, json={"prompt": "a hook", "width": 64, "height": 64, "seed": 11, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def webhook_status(http: httpx.Client, job_id: str, done: Callable[[str], bool], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(f"/v1/jobs/{job_id}").json()["webhook_status"]
        if status is not None and done(status):
            return str(status)
        assert time.monotonic() < deadline, f"webhook_status is {status!r}"
        time.sleep(0.02)


def expected_signature(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivered_at_start(data_dir: Path, pipeline: Pipeline, receiver: Receiver) -> Delivery:
    """Start a server on `data_dir` and return the one delivery its start-up sends (the server is stopped)."""
    running = serve_in_thread(ServerSettings(data_dir=data_dir, allow_private_urls=True), pipeline)
    try:
        (delivery,) = receiver.wait(1)
    finally:
        running.stop()
    return delivery


def stored_job(store: SqliteJobStore, url: str, **fields: Any) -> Job:
    """A job row with a webhook to `url` (signed with SECRET), finished unless `fields` say otherwise."""
    row: dict[str, Any] = {
        "id": new_job_id(),
        "owner": "anon",
        "status": JobStatus.SUCCEEDED,
        "params": job_params(),
        "reference_count": 0,
        "batch_key": "",
        "created": time.time(),
        "webhook_url": url,
        "webhook_secret": SECRET,
    }
    return store.add(Job(**{**row, **fields}))


def test_signed_delivery(start_server: Callable[..., RunningServer], receiver: Receiver) -> None:
    running = start_server(allow_private_urls=True)
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        answer = submit(http, prompt="a hooked fish", webhook_url=receiver.url, webhook_secret=SECRET)
        assert answer["webhook_url"] == receiver.url
        assert answer["status"] == "Pending"
        (delivery,) = receiver.wait(1)
        assert delivery.path == "/hook"
        assert delivery.headers["Content-Type"] == "application/json"
        assert delivery.headers["X-BFL-Signature"] == expected_signature(delivery.body)
        assert not hmac.compare_digest(delivery.headers["X-BFL-Signature"], expected_signature(b"x"))
        body = delivery.json
        assert set(body) >= {"id", "status", "result", "timestamp"}
        assert body["id"] == answer["id"]
        assert body["status"] == "Ready"
        assert body["result"]["seed"] == 11
        assert body["result"]["prompt"] == "a hooked fish"
        assert abs(body["timestamp"] - time.time()) < 60
        sample = http.get(body["result"]["sample"])  # the sample URL in the webhook works
        assert sample.status_code == 200 and sample.headers["content-type"] == "image/jpeg"

        status = webhook_status(http, answer["id"], lambda s: True)
        assert status.startswith("delivered on attempt 1"), status
        time.sleep(0.2)
        assert len(receiver.deliveries) == 1  # exactly one POST


def test_retried_until_delivered(
    start_server: Callable[..., RunningServer], receiver: Receiver, short_retries: None
) -> None:
    running = start_server(allow_private_urls=True)
    receiver.statuses = [500, 500]
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        answer = submit(http, webhook_url=receiver.url, webhook_secret=SECRET)
        status = webhook_status(http, answer["id"], lambda s: s.startswith(("delivered", "failed")))
        assert status.startswith("delivered on attempt 3"), status
    deliveries = receiver.wait(3)
    assert len(deliveries) == 3
    assert len({delivery.body for delivery in deliveries}) == 1  # the same body, the same signature
    assert all(d.headers["X-BFL-Signature"] == expected_signature(d.body) for d in deliveries)


def test_gives_up_after_retries(
    start_server: Callable[..., RunningServer], receiver: Receiver, short_retries: None
) -> None:
    running = start_server(allow_private_urls=True)
    receiver.statuses = [503] * 10
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        answer = submit(http, webhook_url=receiver.url)  # no secret: no signature
        status = webhook_status(http, answer["id"], lambda s: s.startswith(("delivered", "failed")))
    assert status.startswith("failed after 4 attempts"), status
    assert "503" in status
    assert len(receiver.deliveries) == 4
    assert "X-BFL-Signature" not in receiver.deliveries[0].headers


def test_retries_wait_1_5_and_30_seconds(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The schedule, without waiting 36 s: the sender's waits are recorded and skipped. Only those of
    # this test's event loop: the session's servers run loops of their own on other threads.
    waits: list[float] = []
    real_sleep = asyncio.sleep
    loops: list[asyncio.AbstractEventLoop] = []

    async def recorded_sleep(delay: float) -> None:
        if asyncio.get_running_loop() not in loops:
            return await real_sleep(delay)
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    store = SqliteJobStore(tmp_path / "jobs.db")
    job = stored_job(store, receiver.url, webhook_secret=None)
    receiver.statuses = [503] * 10

    async def deliver() -> str:
        loops.append(asyncio.get_running_loop())
        policy = OutboundPolicy(allow_private=True)
        plain = webhooks.WebhookFormat(render=lambda job: {"id": job.id}, sign=lambda body, secret: {})
        sender = webhooks.WebhookSender(policy, store, EventHub(), {}, default=plain)
        try:
            return await sender.deliver(job)
        finally:
            await sender.aclose()

    outcome = asyncio.run(deliver())
    assert waits == [0.0, 1.0, 5.0, 30.0]
    assert outcome.startswith("failed after 4 attempts") and len(receiver.deliveries) == 4
    assert store.get(job.id).webhook_status == outcome


def test_cancelled_job_posts_error(start_server: Callable[..., RunningServer], receiver: Receiver) -> None:
    running = start_server(allow_private_urls=True)
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        blocker = submit(http, width=1024, height=1024)
        answer = submit(http, webhook_url=receiver.url, webhook_secret=SECRET)
        http.post(f"/v1/jobs/{answer['id']}/cancel")
        http.post(f"/v1/jobs/{blocker['id']}/cancel")
        (delivery,) = receiver.wait(1)
    body = delivery.json
    assert body["id"] == answer["id"]
    assert body["status"] == "Error"
    assert body["message"]
    assert delivery.headers["X-BFL-Signature"] == expected_signature(delivery.body)


def test_loopback_refused_by_default(server: RunningServer, receiver: Receiver) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        answer = submit(http, webhook_url=receiver.url, webhook_secret=SECRET)
        status = webhook_status(http, answer["id"], lambda s: True)
    assert status.startswith("refused"), status
    assert "loopback" in status
    assert receiver.deliveries == []


# --- durable deliveries -------------------------------------------------------------------------------------


def test_pending_delivery_is_resumed_after_a_restart(
    tmp_path: Path, server_pipeline: Pipeline, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery waiting for its retry when the server stops is sent by the next server on the data dir."""
    monkeypatch.setattr(webhooks, "RETRY_DELAYS_S", (60.0, 60.0, 60.0))
    settings = ServerSettings(data_dir=tmp_path / "data", allow_private_urls=True)
    receiver.statuses = [503]
    first = serve_in_thread(settings, server_pipeline)
    try:
        with httpx.Client(base_url=first.base_url, timeout=30) as http:
            job = submit(http, webhook_url=receiver.url, webhook_secret=SECRET)
            receiver.wait(1)  # refused once; the retry is a minute away
            assert http.get(f"/v1/jobs/{job['id']}").json()["webhook_status"] is None
    finally:
        first.stop()
    second = serve_in_thread(settings, server_pipeline)
    try:
        with httpx.Client(base_url=second.base_url, timeout=30) as http:
            status = webhook_status(http, job["id"], lambda s: True)
    finally:
        second.stop()
    assert status.startswith("delivered on attempt 1"), status
    _, delivery = receiver.wait(2)
    assert delivery.json["id"] == job["id"] and delivery.json["status"] == "Ready"
    assert delivery.headers["X-BFL-Signature"] == expected_signature(delivery.body)


def test_job_failed_by_crash_recovery_sends_its_webhook(
    tmp_path: Path, server_pipeline: Pipeline, receiver: Receiver
) -> None:
    """A job left running by a crash on its last attempt is failed at start-up, and its webhook says so."""
    data_dir = tmp_path / "data"
    store = SqliteJobStore(data_dir / DATABASE_NAME)
    job = stored_job(
        store, receiver.url, status=JobStatus.RUNNING, started=time.time(), attempts=MAX_ATTEMPTS
    )
    store.close()
    delivery = delivered_at_start(data_dir, server_pipeline, receiver)
    assert delivery.json["id"] == job.id
    assert delivery.json["status"] == "Error"
    assert "crash" in delivery.json["message"]
    assert delivery.headers["X-BFL-Signature"] == expected_signature(delivery.body)
    store = SqliteJobStore(data_dir / DATABASE_NAME)
    try:
        assert (store.get(job.id).webhook_status or "").startswith("delivered on attempt 1")
    finally:
        store.close()


def test_public_url_in_polling_url_and_webhook(
    start_server: Callable[..., RunningServer], receiver: Receiver
) -> None:
    """Behind a proxy: every absolute URL in answers and webhooks (BFL, OpenAI `url`, the job API) starts with
    --public-url."""
    public = "https://images.example.com/klein"
    running = start_server(allow_private_urls=True, public_url=public + "/")
    with httpx.Client(base_url=running.base_url, timeout=30) as http:
        answer = submit(http, webhook_url=receiver.url, webhook_secret=SECRET)
        assert answer["polling_url"] == f"{public}/v1/get_result?id={answer['id']}"
        (delivery,) = receiver.wait(1)
        sample = delivery.json["result"]["sample"]
        assert sample.startswith(public + "/media/")
        assert http.get(sample.removeprefix(public)).status_code == 200  # the proxy strips the prefix
        polled = http.get(answer["polling_url"].removeprefix(public)).json()["result"]["sample"]
        # Each answer signs its URLs afresh (expires = now + the media TTL), so the webhook's and the poll's
        # queries differ once a second has passed between them; the image they name is the same.
        assert polled.partition("?")[0] == sample.partition("?")[0]
        assert http.get(polled.removeprefix(public)).status_code == 200
        # The other answers with absolute URLs: OpenAI's `url` results and the job API.
        (job_image,) = http.get(f"/v1/jobs/{answer['id']}").json()["result"]["images"]
        assert job_image["url"].startswith(public + "/media/")
        body = {"prompt": "behind a proxy", "size": "256x256", "response_format": "url"}
        (image,) = http.post("/v1/images/generations", json=body).json()["data"]
        assert image["url"].startswith(public + "/media/")
    assert delivery.headers["X-BFL-Signature"] == expected_signature(delivery.body)


def test_job_stored_before_formats_is_delivered_in_the_default_format(
    tmp_path: Path, server_pipeline: Pipeline, receiver: Receiver
) -> None:
    """A row written before jobs recorded their webhook format (extra held only the submitter's base_url),
    finished with its delivery pending, is sent at the next start as BFL sends it."""
    data_dir = tmp_path / "data"
    store = SqliteJobStore(data_dir / DATABASE_NAME)
    job = stored_job(
        store,
        receiver.url,
        created=time.time() - 5,
        started=time.time() - 4,
        finished=time.time() - 3,
        progress=1.0,
        result=JobResult(
            images=(JobImage(media="old.jpeg", seed=5),), width=64, height=64, steps=2, guidance=1.0
        ),
        extra={"base_url": "http://old.example:8000"},
    )
    store.close()
    delivery = delivered_at_start(data_dir, server_pipeline, receiver)
    assert delivery.headers["X-BFL-Signature"] == expected_signature(delivery.body)
    body = delivery.json
    assert (body["id"], body["status"], body["result"]["seed"]) == (job.id, "Ready", 5)
    assert body["result"]["sample"].startswith("http://old.example:8000/media/")


# --- the sender and its formats, without a server ----------------------------------------------------------


def _tagged(tag: str) -> webhooks.WebhookFormat:
    """A format whose body and signature header say which format wrote them."""
    return webhooks.WebhookFormat(
        render=lambda job: {"format": tag, "id": job.id}, sign=lambda body, secret: {"X-Signed-By": tag}
    )


def _deliver_all(store: SqliteJobStore, jobs: list[Job]) -> list[str]:
    async def deliver() -> list[str]:
        formats = {"first": _tagged("first"), "second": _tagged("second")}
        sender = webhooks.WebhookSender(
            OutboundPolicy(allow_private=True), store, EventHub(), formats, default=formats["first"]
        )
        try:
            return [await sender.deliver(job) for job in jobs]
        finally:
            await sender.aclose()

    return asyncio.run(deliver())


def test_each_job_is_sent_in_the_format_it_records(tmp_path: Path, receiver: Receiver) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db")
    jobs = [
        stored_job(store, receiver.url, extra={webhooks.FORMAT_KEY: "second"}),
        stored_job(store, receiver.url),  # records none: the default
    ]
    outcomes = _deliver_all(store, jobs)
    assert all(outcome.startswith("delivered on attempt 1") for outcome in outcomes), outcomes
    sent = [(d.json["id"], d.json["format"], d.headers["X-Signed-By"]) for d in receiver.deliveries]
    assert sent == [(jobs[0].id, "second", "second"), (jobs[1].id, "first", "first")]


def test_unregistered_format_is_refused_not_sent(tmp_path: Path, receiver: Receiver) -> None:
    """A job recorded by a server that registered other formats: its outcome says so, and it stays unsent."""
    store = SqliteJobStore(tmp_path / "jobs.db")
    job = stored_job(store, receiver.url, extra={webhooks.FORMAT_KEY: "gone"})
    (outcome,) = _deliver_all(store, [job])
    assert outcome == "refused: no webhook format 'gone' is registered"
    assert store.get(job.id).webhook_status == outcome
    assert receiver.deliveries == []


def test_a_delivery_resumed_past_the_media_lifetime_says_the_result_expired(
    tmp_path: Path, server_pipeline: Pipeline, receiver: Receiver
) -> None:
    """Its image is deleted by then: Error, "the result expired", not Ready with a link to a missing file."""
    data_dir = tmp_path / "data"
    store = SqliteJobStore(data_dir / DATABASE_NAME)
    finished = time.time() - 2 * MEDIA_TTL_S
    job = stored_job(
        store,
        receiver.url,
        started=finished - 1,
        finished=finished,
        result=JobResult(
            images=(JobImage(media="gone.jpeg", seed=5),), width=64, height=64, steps=2, guidance=1.0
        ),
    )
    store.close()
    body = delivered_at_start(data_dir, server_pipeline, receiver).json
    assert (body["id"], body["status"], body["error"]) == (job.id, "Error", "expired")
    assert "the result expired" in body["message"] and "result" not in body
