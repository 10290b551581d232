"""Black Forest Labs' async API against a live kleinserve (wire-formats.md section 4): submit to
POST /v1/flux-2-klein-4b with `x-key`, poll the absolute `polling_url` until `Ready`, GET `result.sample`.
Then the Vercel AI SDK's `@ai-sdk/black-forest-labs` provider (section 5.2) under Node, unchanged: it submits,
polls and downloads the sample itself (`tests/node/generate.mjs bfl`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kleinserve.api import bfl
from kleinserve.api.auth import SqliteKeyStore
from kleinserve.api.server import ServerSettings
from kleinserve.engine.resolve import resolve_request
from kleinserve.errors import InvalidInput
from tests.api.conftest import RunningServer, run_sdk
from tests.conftest import job_params, random_image

MODEL_PATH = "/v1/flux-2-klein-4b"
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
HEADERS = {"x-key": "unused"}  # the shared server has no keys; BFL clients send x-key anyway


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=30) as http:
        yield http


def png_base64(width: int, height: int, seed: int) -> str:
    buffer = io.BytesIO()
    random_image(width, height, seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def poll(http: httpx.Client, polling_url: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET polling_url (absolute) until the status is no longer Pending."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(polling_url)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] != "Pending":
            return body
        assert time.monotonic() < deadline, f"still Pending after {timeout} s: {body}"
        time.sleep(0.05)


def image_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_submit_poll_and_download(client: httpx.Client, server: RunningServer, output_format: str) -> None:
    request = {"prompt": "a lighthouse at dusk", "seed": 1234, "width": 192, "height": 128}
    submitted = client.post(MODEL_PATH, json={**request, "output_format": output_format})
    assert submitted.status_code == 200, submitted.text
    answer = submitted.json()
    assert set(answer) >= {"id", "polling_url", "cost", "input_mp", "output_mp"}
    assert answer["polling_url"] == f"{server.base_url}/v1/get_result?id={answer['id']}"
    assert answer["input_mp"] == 0.0
    assert answer["output_mp"] == round(192 * 128 / 1e6, 2)
    assert answer["cost"] == pytest.approx(1.4)  # klein-4b: 1.4 credits for the first output megapixel

    ready = poll(client, answer["polling_url"])
    assert ready["id"] == answer["id"]
    assert ready["status"] == "Ready", ready
    assert ready["progress"] == 1.0
    result = ready["result"]
    assert result["seed"] == 1234
    assert result["prompt"] == request["prompt"]
    assert result["sample"].startswith(f"{server.base_url}/media/")
    assert result["duration"] >= 0

    sample = client.get(result["sample"])  # with x-key, as the BFL clients do
    assert sample.status_code == 200
    assert sample.headers["content-type"] == f"image/{output_format}"
    image = image_of(sample.content)
    assert image.format == PIL_FORMATS[output_format]
    assert image.size == (192, 128)


def test_same_seed_same_image(client: httpx.Client) -> None:
    samples = []
    for _ in range(2):
        answer = client.post(MODEL_PATH, json={"prompt": "a red kite", "seed": 77, "width": 64, "height": 64})
        assert answer.status_code == 200, answer.text
        ready = poll(client, answer.json()["polling_url"])
        samples.append(client.get(ready["result"]["sample"]).content)
    assert samples[0] == samples[1]


def test_input_images_base64_data_url_and_four(client: httpx.Client, server: RunningServer) -> None:
    raw = png_base64(64, 64, seed=1)
    data_url = "data:image/png;base64," + png_base64(80, 64, seed=2)
    body = {
        "prompt": "combine these",
        "seed": 5,
        "width": 128,
        "height": 128,
        "output_format": "png",
        "input_image": raw,
        "input_image_2": data_url,
        "input_image_3": png_base64(64, 96, seed=3),
        "input_image_4": "data:image/png;base64," + png_base64(96, 96, seed=4),
    }
    submitted = client.post(MODEL_PATH, json=body)
    assert submitted.status_code == 200, submitted.text
    answer = submitted.json()
    assert answer["input_mp"] > 0
    ready = poll(client, answer["polling_url"])
    assert ready["status"] == "Ready", ready
    assert image_of(client.get(ready["result"]["sample"]).content).size == (128, 128)

    job = client.get(f"/v1/jobs/{answer['id']}").json()
    assert len(job["params"]["reference_sizes"]) == 4
    assert job["usage"]["tiles_in"] == 4
    assert job["usage"]["megapixels_in"] > 0

    # Just one reference, as a data URL.
    single = client.post(
        MODEL_PATH, json={"prompt": "edit", "width": 64, "height": 64, "input_image": data_url}
    )
    assert single.status_code == 200, single.text
    assert poll(client, single.json()["polling_url"])["status"] == "Ready"


def test_unknown_id_is_task_not_found(client: httpx.Client) -> None:
    response = client.get("/v1/get_result", params={"id": "no-such-task"})
    assert response.status_code == 200
    assert response.json()["status"] == "Task not found"
    assert response.json()["id"] == "no-such-task"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "width": 32, "height": 64}, "width"),
        ({"seed": 1}, "prompt"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "height": 4096}, "height"),
        ({"prompt": "x", "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({"prompt": "x", "webhook_url": "not a url"}, "webhook_url"),
    ],
)
def test_validation_errors(client: httpx.Client, body: dict[str, Any], field: str) -> None:
    response = client.post(MODEL_PATH, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert detail[0]["loc"] == ["body", field]
    assert detail[0]["msg"] and detail[0]["type"]


def test_steps_and_guidance_apply_to_base_variants_only(client: httpx.Client, server: RunningServer) -> None:
    """BFL's klein endpoint has no steps/guidance and a distilled variant ignores them, as BFL does; base
    variants take them under [flex]'s names (the playground sets them so)."""
    request = bfl.to_request(bfl.FluxKleinInputs(prompt="x", steps=2, guidance=2.5), [])
    distilled = resolve_request(request, server.pipeline.spec).request
    assert (distilled.steps, distilled.guidance) == (None, None)
    base = resolve_request(request, replace(server.pipeline.spec, distilled=False)).request
    assert (base.steps, base.guidance) == (2, 2.5)

    answer = client.post(MODEL_PATH, json={"prompt": "x", "width": 64, "height": 64, "steps": 2})
    assert answer.status_code == 200, answer.text
    job = client.get(f"/v1/jobs/{answer.json()['id']}")  # a BFL id is a kleinserve job id
    assert job.status_code == 200 and job.json()["params"]["steps"] == 4  # the tiny model is distilled
    too_many = client.post(MODEL_PATH, json={"prompt": "x", "steps": 51})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "steps"]


def test_bad_input_image_is_422(client: httpx.Client) -> None:
    response = client.post(MODEL_PATH, json={"prompt": "x", "input_image": "not base64 at all!"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "input_image"


def test_price_and_planned_megapixels() -> None:
    """klein-4b: 1.4 credits for the first output megapixel, 0.1 per further one in or out (section 4.7)."""
    assert bfl.cost(0.0, 0.05) == 1.4
    assert bfl.cost(0.0, 2.0) == 1.5
    assert bfl.cost(1.0, 1.0) == 1.5
    params = job_params(num_images=2, width=1024, height=512, reference_sizes=((1000, 1000), (500, 200)))
    assert bfl.planned_usage(params) == {"input_mp": 1.1, "output_mp": 1.05}
    assert bfl.planned_usage(replace(params, reference_sizes=()))["input_mp"] == 0.0


def test_webhook_signature() -> None:
    """X-BFL-Signature: sha256=<hex HMAC-SHA256 of the raw body>, keyed by the job's webhook_secret."""
    expected = "sha256=" + hmac.new(b"secret", b'{"id":"x"}', hashlib.sha256).hexdigest()
    assert bfl.sign_webhook(b'{"id":"x"}', "secret") == {"X-BFL-Signature": expected}


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("https://images.example.com", "https://images.example.com"),
        ("http://h:8080/klein/", "http://h:8080/klein"),
    ],
)
def test_public_url_setting(tmp_path: Path, given: str, kept: str) -> None:
    assert ServerSettings(data_dir=tmp_path, public_url=given).public_url == kept


@pytest.mark.parametrize(
    "given", ["images.example.com", "ftp://h", "https://", "https://h/?a=1", "http://[::1"]
)
def test_public_url_setting_refuses_what_is_no_origin(tmp_path: Path, given: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        ServerSettings(data_dir=tmp_path, public_url=given)
    assert refused.value.param == "public_url"


# --- @ai-sdk/black-forest-labs under Node ------------------------------------------------------------------


def test_ai_sdk_black_forest_labs_provider(node: str, start_server: Any, tmp_path: Path) -> None:
    """With a key: the provider's x-key authenticates the submit, the polls and the sample download."""
    keys = SqliteKeyStore(tmp_path / "data-0" / "kleinserve.db")  # start_server's first data dir
    key = keys.create("alice")
    keys.close()
    running = start_server()
    with_seed, without_seed = run_sdk(
        node,
        "bfl",
        running.base_url,
        {"prompt": "a paper boat", "size": "256x256", "seed": 42},
        {"prompt": "a paper plane", "size": "128x192"},
        api_key=key,
    )
    for result, size in ((with_seed, (256, 256)), (without_seed, (128, 192))):
        assert "error" not in result, result["error"]
        (image,) = result["images"]
        assert image["mediaType"] == "image/jpeg"  # BFL's default output_format
        decoded = image_of(base64.b64decode(image["base64"]))
        assert decoded.format == "JPEG"
        assert decoded.size == size
        submit, *polls, download = result["requests"]
        assert submit["method"] == "POST"
        assert submit["url"] == f"{running.base_url}{MODEL_PATH}"
        assert submit["headers"]["x-key"] == key
        assert (submit["json"]["width"], submit["json"]["height"]) == size
        assert polls and all("/v1/get_result?id=" in poll["url"] for poll in polls)
        assert download["url"].startswith(f"{running.base_url}/media/")
        assert download["headers"]["x-key"] == key
    assert with_seed["requests"][0]["json"]["seed"] == 42

    # A wrong key is a clean SDK error, not a hang.
    (refused,) = run_sdk(node, "bfl", running.base_url, {"prompt": "x", "size": "64x64"}, api_key="wrong")
    assert refused["error"]["statusCode"] == 401
