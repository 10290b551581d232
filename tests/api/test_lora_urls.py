"""Adapters by URL that succeed (issue 17, item 1): a real https server with its own CA (SSL_CERT_FILE), the
file downloaded, checked and kept under its content hash, the image the same as with the same file by name,
and the hash a name that downloads nothing. The refusals (no flag, http, private addresses) are in
tests/api/test_loras.py."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kleinserve.api.server import ServerSettings
from kleinserve.engine import Pipeline
from tests.api.conftest import RunningServer, serve_in_thread
from tests.api.test_loras import lora_dir, lora_pipeline, recorded_loras  # noqa: F401  (fixtures)
from tests.https import HttpsFiles

BODY = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 1, "seed": 5}


@pytest.fixture(scope="module")
def files(lora_dir: Path) -> Iterator[HttpsFiles]:  # noqa: F811 (the fixture imported above)
    served = {"/fox.safetensors": (lora_dir / "fox.safetensors").read_bytes(), "/junk.safetensors": b"x" * 64}
    with HttpsFiles(served) as running:
        yield running


@pytest.fixture
def url_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: HttpsFiles,
    lora_pipeline: Pipeline,  # noqa: F811 (the fixture imported above)
    lora_dir: Path,  # noqa: F811
) -> Iterator[RunningServer]:
    """`serve --lora-dir --allow-lora-urls --allow-private-urls` trusting the files' CA (read when the app is
    built, as at a server's start)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(files.ca_path))
    settings = ServerSettings(
        data_dir=tmp_path, lora_dir=lora_dir, allow_lora_urls=True, allow_private_urls=True
    )
    running = serve_in_thread(settings, lora_pipeline)
    yield running
    running.stop()


def _image(server: RunningServer, loras: list[dict[str, Any]]) -> tuple[bytes, str]:
    answer = httpx.post(f"{server.base_url}/v1/images/generations", json={**BODY, "loras": loras}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return base64.b64decode(body["data"][0]["b64_json"]), body["id"]


def test_an_adapter_by_https_url_is_kept_by_hash_and_draws_as_by_name(
    url_server: RunningServer,
    files: HttpsFiles,
    lora_pipeline: Pipeline,  # noqa: F811
    lora_dir: Path,  # noqa: F811
) -> None:
    data = (lora_dir / "fox.safetensors").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    by_url, job_id = _image(url_server, [{"url": files.url("/fox.safetensors"), "scale": 0.5}])
    assert files.hits["/fox.safetensors"] == 1
    assert recorded_loras(url_server, job_id) == [{"name": f"sha256:{digest}", "scale": 0.5}]
    adapters = lora_pipeline.adapters
    assert adapters is not None
    assert (adapters.downloads / f"{digest}.safetensors").read_bytes() == data

    by_name, _ = _image(url_server, [{"name": "fox", "scale": 0.5}])
    by_hash, _ = _image(url_server, [{"name": f"sha256:{digest}", "scale": 0.5}])
    plain, _ = _image(url_server, [])
    assert by_url == by_name == by_hash != plain
    assert files.hits["/fox.safetensors"] == 1  # the hash names the kept file: nothing downloaded again


def test_a_bad_file_or_a_missing_url_is_a_clear_400(url_server: RunningServer, files: HttpsFiles) -> None:
    for path, words in (("/junk.safetensors", "safetensors"), ("/none.safetensors", "404")):
        body = {**BODY, "loras": [{"name": "fox"}, {"url": files.url(path)}]}
        answer = httpx.post(f"{url_server.base_url}/v1/images/generations", json=body, timeout=60)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "loras[1]" and words in error["message"], error
    assert httpx.get(f"{url_server.base_url}/healthz", timeout=30).status_code == 200
