"""The scaled-out mode end to end (issue 16, T3): real `kleinserve api` and `kleinserve worker` processes on
one PostgreSQL database and one S3 bucket (moto), killed, stopped and cut off for real.

- A worker SIGKILLed mid-batch: its jobs are re-run once by the other; all 20 succeed, none twice, no orphan.
- An API SIGKILLed: its polling and SSE clients carry on at the other API and see their job finish.
- PostgreSQL stopped immediately and restarted: 503 + Retry-After meanwhile, nothing acknowledged lost.
- Cancel across processes (queued at once, running at its next step, its batch partner unharmed), a
  synchronous OpenAI request answered by a worker, SSE on one API of a job submitted on the other.
- A signed webhook, retried after a failed attempt, delivered once.
- A stale worker (SIGSTOPped past its lease) cannot commit: the re-run's result stands, its images are gone.
- LoRA adapters scaled out: by name from each process's --lora-dir, and by https URL (downloaded by an API,
  shared through the bucket, applied by a worker): the same image either way.

Every process runs one torch thread; every wait is bounded; the `cluster` fixture reaps every process and
prints their logs with a failing test's output.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import psycopg
import pytest
from PIL import Image
from psycopg.rows import dict_row

from tests.api.test_loras import write_adapter
from tests.api.test_webhooks import SECRET, Receiver, expected_signature, receiver  # noqa: F401
from tests.https import HttpsFiles
from tests.postgres import PostgresServer
from tests.s3 import S3Media, client, new_bucket
from tests.scale.processes import LEASE_S, ApiProcess, Cluster, WorkerProcess

SUBMIT = "/v1/flux-2-klein-4b"
LONG = (1024, 1024)  # ~2.5 s of one worker thread: long enough to act on while it runs
TERMINAL = ("succeeded", "failed", "cancelled")
T = TypeVar("T")


@pytest.fixture(scope="module")
def adapter_files(tiny_dir: Path) -> Iterator[HttpsFiles]:
    """The adapter `fox` (a file of the processes' --lora-dir) served over https as /fox.safetensors."""
    with TemporaryDirectory() as folder:
        data = write_adapter(tiny_dir, Path(folder) / "fox.safetensors", seed=0).read_bytes()
    with HttpsFiles({"/fox.safetensors": data}) as files:
        yield files


@pytest.fixture(scope="module")
def processes(
    postgres_server: PostgresServer,
    s3_endpoint: str,
    tiny_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    adapter_files: HttpsFiles,
) -> Iterator[Cluster]:
    """One database, one bucket and their processes for the whole module: starting an API or a worker takes
    ~6 s of CPU (torch, diffusers), so tests share them and `cluster` replaces the ones a test killed."""
    media = new_bucket(s3_endpoint)
    root = tmp_path_factory.mktemp("scale")
    loras = tmp_path_factory.mktemp("scale-loras")
    (loras / "fox.safetensors").write_bytes(adapter_files.files["/fox.safetensors"])
    running = Cluster(
        postgres_server.new_database(),
        media.url,
        tiny_dir,
        root,
        env={**media.env, "SSL_CERT_FILE": str(adapter_files.ca_path)},
        api_options=("--lora-dir", str(loras), "--allow-lora-urls"),
        worker_options=("--lora-dir", str(loras)),
    )
    yield running
    running.stop()


@pytest.fixture
def cluster(processes: Cluster) -> Iterator[Cluster]:
    """2 APIs and 2 workers alive and ready; what they log during the test goes with a failure's output."""
    since = processes.log_sizes()
    try:
        processes.top_up(apis=2, workers=2)
        yield processes
    finally:
        print(processes.report(since))  # pytest shows it with a failing test's captured output


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30, follow_redirects=True) as session:
        yield session


def wait_until(condition: Callable[[], T | None | Literal[False]], timeout: float, what: str) -> T:
    """The first truthy value of `condition()`, polled every 50 ms; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)
    return value


def submit(http: httpx.Client, api: ApiProcess, size: tuple[int, int], seed: int, **body: Any) -> str:
    """A BFL async submission; the job's id (a kleinserve job id)."""
    width, height = size
    prompt = f"job {seed}"
    answer = http.post(
        api.base_url + SUBMIT, json={"prompt": prompt, "width": width, "height": height, "seed": seed, **body}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def job(http: httpx.Client, api: ApiProcess, job_id: str) -> dict[str, Any]:
    answer = http.get(f"{api.base_url}/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def rows(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every job row as the store wrote it, by id."""
    with psycopg.connect(cluster.database_url, row_factory=dict_row) as connection:
        found = connection.execute("SELECT id, status, attempts, worker, fence, progress, result FROM jobs")
        return {row["id"]: row for row in found}


def ended(cluster: Cluster, ids: list[str] | None, timeout: float) -> dict[str, dict[str, Any]]:
    """Every row, once each of `ids` (None: every job) has ended."""

    def now_ended() -> dict[str, dict[str, Any]] | None:
        found = rows(cluster)
        return found if all(found[job_id]["status"] in TERMINAL for job_id in ids or found) else None

    return wait_until(now_ended, timeout, f"{len(ids) if ids else 'all'} jobs to end")


def running_worker(cluster: Cluster) -> WorkerProcess | None:
    """The worker of a batch that has just started (so that it still runs when the test acts), if any."""
    with psycopg.connect(cluster.database_url) as connection:
        found = connection.execute(
            "SELECT worker FROM jobs WHERE status = 'running' AND progress < 0.5 LIMIT 1"
        ).fetchone()
    return next((worker for worker in cluster.workers if found and worker.worker_id == found[0]), None)


def result_media(row: dict[str, Any]) -> list[str]:
    """The media names of a row's result (none before it succeeded)."""
    return [image["media"] for image in json.loads(row["result"])["images"]] if row["result"] else []


def assert_no_orphans(cluster: Cluster) -> None:
    """Once no job is queued or running: the bucket holds exactly the images of the succeeded jobs."""
    settled = ended(cluster, None, 60)
    media = S3Media(cluster.media_url, cluster.env)
    prefix = f"{media.prefix}/media/"
    pages = (
        client(media.endpoint).get_paginator("list_objects_v2").paginate(Bucket=media.bucket, Prefix=prefix)
    )
    stored = {item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", [])}
    assert stored == {name for row in settled.values() for name in result_media(row)}


def download(http: httpx.Client, api: ApiProcess, url: str) -> Image.Image:
    """The image behind a signed link (from whichever API made it), fetched through `api`."""
    parts = urlsplit(url)
    answer = http.get(f"{api.base_url}{parts.path}?{parts.query}")
    assert answer.status_code == 200, (api.name, url, answer.text)
    image = Image.open(io.BytesIO(answer.content))
    image.load()
    return image


def follow(api: ApiProcess, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Append the events of `GET /v1/jobs/{id}/events` on `api` until the server ends the stream."""
    with (
        httpx.Client(timeout=30) as session,
        session.stream("GET", f"{api.base_url}/v1/jobs/{job_id}/events") as response,
    ):
        assert response.status_code == 200, response.read()
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))


def follow_in_thread(
    pool: ThreadPoolExecutor, api: ApiProcess, job_id: str
) -> tuple[Future[None], list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    return pool.submit(follow, api, job_id, events), events


def step_numbers(events: list[tuple[str, dict[str, Any]]]) -> list[int]:
    return [data["step"] for name, data in events if name == "step"]


def test_cancel_across_processes_and_a_synchronous_request(cluster: Cluster, http: httpx.Client) -> None:
    a, b = cluster.apis
    # Both workers busy (two sizes: two batches) while the jobs under test queue up behind them.
    blockers = [submit(http, a, LONG, seed=0), submit(http, b, (1024, 960), seed=1)]
    wait_until(
        lambda: all(rows(cluster)[job_id]["status"] == "running" for job_id in blockers),
        60,
        "both workers busy",
    )
    cancelled, partner = (submit(http, a, (768, 768), seed=seed) for seed in (2, 3))  # one batch key
    queued = submit(http, a, (256, 256), seed=4)

    answer = http.post(f"{a.base_url}/v1/jobs/{queued}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"  # at once
    assert job(http, b, queued)["status"] == "cancelled"

    with ThreadPoolExecutor(1) as pool:
        stream, events = follow_in_thread(pool, b, partner)  # B streams a job submitted on A
        wait_until(lambda: job(http, b, cancelled)["status"] == "running", 60, "the batch to run")
        asked = time.monotonic()
        answer = http.post(f"{a.base_url}/v1/jobs/{cancelled}/cancel")
        assert answer.status_code == 200 and answer.json()["status"] in ("running", "cancelled")
        last = wait_until(
            lambda: (found := job(http, b, cancelled))["status"] in TERMINAL and found, 10, "cancel"
        )
        assert time.monotonic() - asked < 3.0  # at its next step, not after the batch
        assert last["status"] == "cancelled" and last["result"] is None and last["progress"] < 1.0, last
        stream.result(timeout=30)
    assert events[-1][0] == "succeeded", events  # the batch partner ran to its end
    steps = step_numbers(events)
    assert steps == list(range(1, steps[-1] + 1)) and len(steps) > 1
    # The worker sends previews of a job that a subscriber on another process asked for (it was queued when
    # B's stream began, so every step has one): thumbnails of the job's own image.
    previews = [data["preview"] for name, data in events if name == "step" and "preview" in data]
    assert len(previews) == len(steps), events
    for preview in previews:
        with Image.open(io.BytesIO(base64.b64decode(preview))) as image:
            assert image.size == (256, 256)
    assert job(http, a, partner)["status"] == "succeeded"
    assert job(http, a, queued)["status"] == "cancelled"  # never run after all

    with openai.OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
        response = sdk.images.generate(
            model="flux-2-klein-4b", prompt="a synchronous job", size="256x256", extra_body={"seed": 5}
        )
        # Streamed: the partial images a worker's steps make reach the API process the caller is on.
        streamed = list(
            sdk.images.generate(
                model="flux-2-klein-4b",
                prompt="a synchronous job",
                size="256x256",
                stream=True,
                partial_images=2,
                extra_body={"seed": 5},
            )
        )
    assert response.data is not None and response.data[0].b64_json is not None
    with Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))) as image:
        assert image.size == (256, 256)
    # partial_images partial images, then the image. A 4-step tiny-random job ends on the worker before the
    # API process reads its steps' previews: the job's row asks for them from its first step, each step's
    # are stored apart and outlive the job, and the API's row poll does not settle the job ahead of its step
    # notifies (each of these once cost partial images: 0 or 1 of 2).
    *partials, final = streamed
    assert len(partials) == 2 and final.type == "image_generation.completed", streamed
    assert base64.b64decode(final.b64_json) == base64.b64decode(response.data[0].b64_json)  # same seed
    for event in partials:
        assert event.type == "image_generation.partial_image"
        with Image.open(io.BytesIO(base64.b64decode(event.b64_json))) as image:
            assert image.size == (256, 256)
    assert_no_orphans(cluster)


def test_signed_webhook_retried_and_delivered_once(
    cluster: Cluster,
    http: httpx.Client,
    receiver: Receiver,  # noqa: F811 (the fixture imported above)
) -> None:
    a, b = cluster.apis
    receiver.statuses = [500]  # the first attempt fails
    job_id = submit(http, a, (64, 64), seed=11, webhook_url=receiver.url, webhook_secret=SECRET)

    status = wait_until(
        lambda: (
            (found := job(http, b, job_id)["webhook_status"])
            and found.startswith(("delivered", "failed"))
            and found
        ),
        30,
        "the webhook's outcome",
    )
    assert status.startswith("delivered on attempt 2"), status
    first, second = receiver.wait(2)
    assert first.body == second.body  # the same body, the same signature
    assert all(
        delivery.headers["X-BFL-Signature"] == expected_signature(delivery.body)
        for delivery in (first, second)
    )
    assert second.json["id"] == job_id and second.json["status"] == "Ready"
    assert download(http, b, second.json["result"]["sample"]).size == (64, 64)
    time.sleep(2 * LEASE_S)  # long past any other housekeeper's turn
    assert len(receiver.deliveries) == 2  # delivered once


def test_sigkill_a_worker_mid_batch_loses_and_duplicates_nothing(
    cluster: Cluster, http: httpx.Client
) -> None:
    apis = cluster.apis
    sizes = ((512, 512), (512, 384))  # two batch keys
    ids = [submit(http, apis[index % 2], sizes[index // 2 % 2], seed=index) for index in range(20)]

    victim = wait_until(lambda: running_worker(cluster), 30, "a worker to start a batch")
    assert victim.kill() == -signal.SIGKILL
    orphaned = [
        job_id
        for job_id, row in rows(cluster).items()
        if row["status"] == "running" and row["worker"] == victim.worker_id
    ]
    assert orphaned, "the killed worker held no running job"

    final = ended(cluster, ids, 60 + LEASE_S)
    assert [final[job_id]["status"] for job_id in ids] == ["succeeded"] * len(ids)
    assert all(final[job_id]["attempts"] <= 2 for job_id in ids)
    assert all(final[job_id]["attempts"] == 2 for job_id in orphaned)  # run again, once
    names = [name for job_id in ids for name in result_media(final[job_id])]
    assert len(names) == len(set(names)) == len(ids)  # one image per job: none completed twice
    assert_no_orphans(cluster)  # nor left an image of the killed run
    for index, job_id in enumerate(ids):
        seen = [job(http, api, job_id) for api in apis]
        assert [answer["status"] for answer in seen] == ["succeeded", "succeeded"]
        (image,) = seen[0]["result"]["images"]
        for api in apis:  # a link either API signed works on both
            assert download(http, api, image["url"]).size == sizes[index // 2 % 2]


def test_sigkill_an_api_its_clients_carry_on_at_the_other(cluster: Cluster, http: httpx.Client) -> None:
    doomed, other = cluster.apis
    job_id = submit(http, doomed, LONG, seed=21)
    with ThreadPoolExecutor(1) as pool:
        stream, events = follow_in_thread(pool, doomed, job_id)
        wait_until(lambda: step_numbers(events), 60, "the first step event on the doomed API")
        assert doomed.kill() == -signal.SIGKILL
        with pytest.raises(httpx.TransportError):
            stream.result(timeout=10)  # the stream breaks, it does not end
    assert not any(name in TERMINAL for name, _ in events)
    with pytest.raises(httpx.ConnectError):
        http.get(f"{doomed.base_url}/v1/get_result", params={"id": job_id})

    resumed: list[tuple[str, dict[str, Any]]] = []
    follow(other, job_id, resumed)  # re-opened on the other API: to the end
    assert resumed[-1][0] == "succeeded", resumed
    polled = wait_until(
        lambda: (
            (answer := http.get(f"{other.base_url}/v1/get_result", params={"id": job_id}).json())["status"]
            == "Ready"
            and answer
        ),
        30,
        "the BFL result on the other API",
    )
    assert download(http, other, polled["result"]["sample"]).size == LONG


def test_a_stale_worker_cannot_commit_after_its_lease_was_taken_over(
    cluster: Cluster, http: httpx.Client
) -> None:
    api = cluster.apis[0]
    job_id = submit(http, api, LONG, seed=31)
    stale = wait_until(lambda: running_worker(cluster), 30, "the job to run")
    stale.signal(signal.SIGSTOP)  # mid-batch, as a worker cut off from the network
    (taker,) = (worker for worker in cluster.workers if worker is not stale)

    row = ended(cluster, [job_id], 60 + LEASE_S)[job_id]  # the lease runs out, the job is run again
    assert row["status"] == "succeeded" and row["attempts"] == 2
    assert row["worker"] == taker.worker_id
    stale.signal(signal.SIGCONT)
    assert stale.terminate(60) == 0  # it drains: finishes its batch, whose commit is refused

    assert rows(cluster)[job_id] == row  # the result is the second run's
    assert_no_orphans(cluster)  # and the stale run's images are not left
    (image,) = job(http, api, job_id)["result"]["images"]
    assert download(http, api, image["url"]).size == LONG


def test_postgres_down_answers_503_then_resumes_losing_nothing(
    cluster: Cluster, http: httpx.Client, postgres_server: PostgresServer
) -> None:
    a, b = cluster.apis
    acknowledged = [submit(http, a, LONG, seed=41)]
    acknowledged += [submit(http, (a, b)[seed % 2], (512, 512), seed=seed) for seed in range(42, 47)]
    wait_until(lambda: job(http, b, acknowledged[0])["status"] == "running", 60, "the first job to run")

    postgres_server.kill()  # pg_ctl stop -m immediate, with jobs running and queued
    try:
        for api in (a, b):
            refused = http.post(api.base_url + SUBMIT, json={"prompt": "during the outage"})
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) > 0
            unread = http.get(f"{api.base_url}/v1/jobs/{acknowledged[1]}")
            assert unread.status_code == 503, unread.text
            assert int(unread.headers["Retry-After"]) > 0
        time.sleep(LEASE_S)  # an outage longer than a lease
    finally:
        postgres_server.start_again()

    before = set(rows(cluster))
    late = wait_until(
        lambda: (
            (
                answer := http.post(b.base_url + SUBMIT, json={"prompt": "after", "width": 64, "height": 64})
            ).status_code
            == 200
            and answer.json()["id"]
        ),
        30,
        "submissions to be accepted again",
    )
    acknowledged.append(str(late))
    final = ended(cluster, acknowledged, 90)
    assert set(final) - before == {late}  # nothing acknowledged lost, nothing refused kept
    assert [final[job_id]["status"] for job_id in acknowledged] == ["succeeded"] * len(acknowledged)
    assert all(final[job_id]["attempts"] <= 2 for job_id in acknowledged)
    for job_id in acknowledged:
        (image,) = job(http, a, job_id)["result"]["images"]
        download(http, a, image["url"])
    assert_no_orphans(cluster)


def test_adapters_by_name_and_by_url_across_processes(
    cluster: Cluster, http: httpx.Client, adapter_files: HttpsFiles
) -> None:
    a, b = cluster.apis
    listed = http.get(f"{b.base_url}/v1/loras").json()["data"]
    assert [adapter["name"] for adapter in listed] == ["fox"]

    def image(api: ApiProcess, loras: list[dict[str, Any]]) -> np.ndarray:
        body = {"prompt": "a fox", "size": "256x256", "seed": 7, "loras": loras}
        answer = http.post(f"{api.base_url}/v1/images/generations", json=body)
        assert answer.status_code == 200, answer.text
        with Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))) as made:
            return np.asarray(made.convert("RGB"), dtype=np.int16)

    # One at a time, so that each runs alone (a batch of several is equal only within 1/255) and bit-equal.
    by_name = image(b, [{"name": "fox", "scale": 0.5}])
    by_url = image(a, [{"url": adapter_files.url("/fox.safetensors"), "scale": 0.5}])
    plain = image(a, [])
    assert np.array_equal(by_name, by_url)
    assert not np.array_equal(by_name, plain)  # the adapter changed the image (a little: rank 2, scale 0.5)
    digest = hashlib.sha256(adapter_files.files["/fox.safetensors"]).hexdigest()
    media = S3Media(cluster.media_url, cluster.env)
    key = f"{media.prefix}/loras/{digest}.safetensors"  # put there by API a, fetched by a worker
    kept = client(media.endpoint).head_object(Bucket=media.bucket, Key=key)
    assert kept["ContentLength"] == len(adapter_files.files["/fox.safetensors"])
