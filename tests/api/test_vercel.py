"""The Vercel AI SDK against a live kleinserve: `generateImage` from the `ai` package under Node, with
`@ai-sdk/openai-compatible` (OpenAI Images routes under /v1) and `@ai-sdk/gateway` (POST /image-model, the AI
Gateway's image model protocol, specification version 3). wire-formats.md section 5.1 and 5.3.

tests/node/generate.mjs makes the calls and prints what the SDK returned and what it put on the wire; the
packages are the exact versions in tests/node/package-lock.json (`make node-setup` installs them, `make test`
does so first). Node.js and those packages are required: without them these tests fail, they never skip.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kleinserve.api.auth import SqliteKeyStore
from kleinserve.api.vercel import size_for_aspect_ratio
from tests.api.conftest import RunningServer, run_sdk
from tests.conftest import random_png_files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pngs(result: dict[str, Any]) -> list[bytes]:
    """The images of a successful call, each checked to be a PNG the SDK recognised as one."""
    assert "error" not in result, result["error"]
    data = []
    for image in result["images"]:
        assert image["mediaType"] == "image/png"
        payload = base64.b64decode(image["base64"], validate=True)
        assert payload.startswith(PNG_SIGNATURE)
        data.append(payload)
    return data


def size_of(payload: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(payload)) as image:
        return image.size


def only_request(result: dict[str, Any]) -> dict[str, Any]:
    (request,) = result["requests"]
    return request


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return random_png_files(tmp_path_factory.mktemp("vercel-references"), 2, 96, seed=200)


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """A loopback HTTP server for reference images given as URLs: `serve(path)` returns the file's URL."""
    root = tmp_path / "served"
    root.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            requested.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def serve(path: Path) -> str:
        shutil.copy(path, root / path.name)
        return f"http://127.0.0.1:{httpd.server_address[1]}/{path.name}"

    serve.requested = requested  # type: ignore[attr-defined]
    yield serve
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


# --- @ai-sdk/openai-compatible ----------------------------------------------------------------------------


def test_openai_compatible_text_to_image(server: RunningServer, node: str) -> None:
    (result,) = run_sdk(
        node, "openai-compatible", server.base_url, {"prompt": "a red fox", "n": 2, "size": "256x256"}
    )
    images = pngs(result)
    assert len(images) == 2
    assert [size_of(image) for image in images] == [(256, 256), (256, 256)]
    assert images[0] != images[1]  # seeds s and s+1
    assert result["warnings"] == []
    request = only_request(result)  # n=2 is one call: the provider asks for up to 10 images at once
    assert request["url"] == f"{server.base_url}/v1/images/generations"
    assert request["method"] == "POST"
    assert request["headers"]["authorization"] == "Bearer unused"
    assert request["json"] == {
        "model": "flux-2-klein-4b",
        "prompt": "a red fox",
        "n": 2,
        "size": "256x256",
        "response_format": "b64_json",
    }


def test_openai_compatible_seed_only_through_provider_options(server: RunningServer, node: str) -> None:
    """The provider never sends `seed` (it warns 'unsupported'); providerOptions.kleinserve.seed is sent as
    a body field, and the server honours it."""
    call = {"prompt": "a red fox", "size": "256x256"}
    top_level, seven, seven_again, eight = run_sdk(
        node,
        "openai-compatible",
        server.base_url,
        {**call, "seed": 7},
        {**call, "providerOptions": {"kleinserve": {"seed": 7}}},
        {**call, "providerOptions": {"kleinserve": {"seed": 7}}},
        {**call, "providerOptions": {"kleinserve": {"seed": 8}}},
    )
    assert {"type": "unsupported", "feature": "seed"} in top_level["warnings"]
    assert "seed" not in only_request(top_level)["json"]
    assert only_request(seven)["json"]["seed"] == 7
    assert seven["warnings"] == []
    assert pngs(seven) == pngs(seven_again)
    assert pngs(eight) != pngs(seven)
    assert pngs(top_level) != pngs(seven)  # a random seed, not 7


def test_openai_compatible_edit_is_multipart(
    server: RunningServer, node: str, reference_files: list[Path]
) -> None:
    """`prompt: {text, images: [Uint8Array]}` goes to /v1/images/edits as multipart: one file as `image`,
    two as `image[]`; provider options become form fields."""
    first, second = (str(path) for path in reference_files)
    options = {"providerOptions": {"kleinserve": {"seed": 3}}, "size": "256x256"}
    text_only, one, one_again, two = run_sdk(
        node,
        "openai-compatible",
        server.base_url,
        {"prompt": "the same fox at night", **options},
        {"prompt": "the same fox at night", "images": [first], **options},
        {"prompt": "the same fox at night", "images": [first], **options},
        {"prompt": "the same fox at night", "images": [first, second], **options},
    )
    assert only_request(text_only)["url"].endswith("/v1/images/generations")
    request = only_request(one)
    assert request["url"] == f"{server.base_url}/v1/images/edits"
    assert request["bodyType"] == "FormData"
    fields = {part["name"]: part for part in request["form"]}
    assert fields["image"]["file"]["type"] == "image/png"
    assert fields["image"]["file"]["size"] == reference_files[0].stat().st_size
    assert {name: fields[name]["value"] for name in ("model", "prompt", "n", "size", "seed")} == {
        "model": "flux-2-klein-4b",
        "prompt": "the same fox at night",
        "n": "1",
        "size": "256x256",
        "seed": "3",
    }
    assert [part["name"] for part in only_request(two)["form"]].count("image[]") == 2
    (plain,), (edited,), (edited_again,), (two_refs,) = (pngs(r) for r in (text_only, one, one_again, two))
    assert size_of(edited) == (256, 256)
    assert edited == edited_again
    assert len({plain, edited, two_refs}) == 3  # each reference changes the result


def test_openai_compatible_error_message(server: RunningServer, node: str) -> None:
    (result,) = run_sdk(node, "openai-compatible", server.base_url, {"prompt": "a fox", "size": "100x100"})
    error = result["error"]
    assert error["name"] == "AI_APICallError"
    assert error["statusCode"] == 400
    assert "size" in error["message"] and "256-2048" in error["message"]
    assert error["isRetryable"] is False


# --- @ai-sdk/gateway against /image-model -----------------------------------------------------------------


def test_gateway_text_to_image(server: RunningServer, node: str) -> None:
    call = {"prompt": "a red fox", "n": 2, "size": "256x256", "seed": 7}
    first, second = run_sdk(node, "gateway", server.base_url, call, call)
    request = only_request(first)
    assert request["url"] == f"{server.base_url}/image-model"
    assert request["headers"]["ai-model-id"] == "bfl/flux-2-klein-4b"
    assert request["headers"]["ai-image-model-specification-version"] == "3"
    assert request["headers"]["authorization"] == "Bearer unused"
    assert request["json"] == {
        "prompt": "a red fox",
        "n": 2,
        "size": "256x256",
        "seed": 7,
        "providerOptions": {},
    }
    images = pngs(first)
    assert [size_of(image) for image in images] == [(256, 256), (256, 256)]
    assert images[0] != images[1]
    assert pngs(second) == images  # the gateway sends the seed itself
    assert first["providerMetadata"] == {"kleinserve": {"images": [{"seed": 7}, {"seed": 8}]}}
    assert first["warnings"] == []


def test_gateway_files_as_base64_and_as_url(
    start_server: Callable[..., RunningServer],
    node: str,
    reference_files: list[Path],
    file_server: Callable[[Path], str],
) -> None:
    """A Uint8Array becomes `{type: "file", mediaType, data: <base64>}`, a URL `{type: "url", url}` that the
    server downloads (from loopback here, so the server allows private URLs); both give the same image."""
    running = start_server(allow_private_urls=True)
    url = file_server(reference_files[0])
    call = {"prompt": "the same fox at night", "size": "256x256", "seed": 3}
    text_only, as_file, as_url = run_sdk(
        node,
        "gateway",
        running.base_url,
        call,
        {**call, "images": [str(reference_files[0])]},
        {**call, "images": [url]},
    )
    expected_data = base64.b64encode(reference_files[0].read_bytes()).decode()
    assert only_request(as_file)["json"]["files"] == [
        {"type": "file", "data": expected_data, "mediaType": "image/png"}
    ]
    assert only_request(as_url)["json"]["files"] == [{"type": "url", "url": url}]
    assert file_server.requested == [f"/{reference_files[0].name}"]  # type: ignore[attr-defined]
    (plain,), (from_file,), (from_url,) = pngs(text_only), pngs(as_file), pngs(as_url)
    assert from_file == from_url
    assert from_file != plain


def test_gateway_url_file_to_loopback_is_refused_by_default(server: RunningServer, node: str) -> None:
    (result,) = run_sdk(
        node,
        "gateway",
        server.base_url,
        {"prompt": "a fox", "size": "256x256", "images": ["http://127.0.0.1:9/reference.png"]},
    )
    error = result["error"]
    assert error["name"] == "GatewayInvalidRequestError"
    assert error["statusCode"] == 400
    assert "files[0]" in error["message"] and "private or loopback" in error["message"]


def test_gateway_errors_map_to_gateway_error_classes(server: RunningServer, node: str) -> None:
    bad_size, unknown_model = run_sdk(
        node,
        "gateway",
        server.base_url,
        {"prompt": "a fox", "size": "100x100"},
        {"prompt": "a fox", "size": "256x256", "model": "bfl/flux-2-pro"},
    )
    assert bad_size["error"]["name"] == "GatewayInvalidRequestError"
    assert bad_size["error"]["statusCode"] == 400
    assert "256-2048" in bad_size["error"]["message"]
    assert unknown_model["error"]["name"] == "GatewayModelNotFoundError"
    assert unknown_model["error"]["statusCode"] == 404
    assert "bfl/flux-2-pro" in unknown_model["error"]["message"]


def test_gateway_provider_options(server: RunningServer, node: str) -> None:
    """Options under any provider key; unknown ones come back as warnings."""
    (result,) = run_sdk(
        node,
        "gateway",
        server.base_url,
        {
            "prompt": "a fox",
            "size": "256x256",
            "seed": 1,
            "providerOptions": {"bfl": {"output_format": "jpeg", "safety_tolerance": 2}},
        },
    )
    assert "error" not in result, result["error"]
    (image,) = result["images"]
    assert image["mediaType"] == "image/jpeg"
    assert base64.b64decode(image["base64"]).startswith(b"\xff\xd8\xff")
    assert result["warnings"] == [
        {"type": "other", "message": "providerOptions.bfl.safety_tolerance is ignored"}
    ]


@pytest.mark.parametrize("provider", ["openai-compatible", "gateway"])
def test_api_key(start_server: Callable[..., RunningServer], node: str, provider: str) -> None:
    """With a key created, the SDK's apiKey (sent as a Bearer token) is checked."""
    running = start_server()
    keys = SqliteKeyStore(running.settings.data_dir / "kleinserve.db")
    try:
        key = keys.create("vercel-client")
    finally:
        keys.close()
    call = {"prompt": "a fox", "size": "256x256"}
    (accepted,) = run_sdk(node, provider, running.base_url, call, api_key=key)
    assert only_request(accepted)["headers"]["authorization"] == f"Bearer {key}"
    assert len(pngs(accepted)) == 1
    (refused,) = run_sdk(node, provider, running.base_url, call, api_key="not-the-key")
    assert refused["error"]["statusCode"] == 401
    expected = "AI_APICallError" if provider == "openai-compatible" else "GatewayAuthenticationError"
    assert refused["error"]["name"] == expected


# --- /image-model on the wire (what the gateway provider would send, and what it must refuse) -------------


def test_image_model_without_gateway_headers(server: RunningServer) -> None:
    """No ai-model-id means the served model; the answer is the documented `{images, warnings}`."""
    response = httpx.post(
        f"{server.base_url}/image-model", json={"prompt": "a fox", "n": 1, "size": "256x256"}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"images", "warnings"}
    (image,) = body["images"]
    assert size_of(base64.b64decode(image)) == (256, 256)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a fox", "n": True}, "n"),
        ({"prompt": "a fox", "n": 5}, "n"),
        ({"prompt": "a fox", "seed": 1.5}, "seed"),
        ({"prompt": "a fox", "seed": -1}, "seed"),
        ({"prompt": "a fox", "size": "big"}, "size"),
        ({"prompt": "a fox", "aspectRatio": "10:1"}, "aspectRatio"),
        ({"prompt": "a fox", "providerOptions": "steps=4"}, "providerOptions"),
        ({"prompt": "a fox", "providerOptions": {"bfl": {"steps": "four"}}}, "providerOptions.bfl.steps"),
        (
            {"prompt": "a fox", "providerOptions": {"bfl": {"guidance": "high"}}},
            "providerOptions.bfl.guidance",
        ),
        ({"prompt": "a fox", "providerOptions": {"x": {"output_format": "gif"}}}, "output_format"),
        ({"prompt": "a fox", "files": [{"type": "blob"}]}, "files[0]"),
        ({"prompt": "a fox", "files": [{"type": "file", "data": "not base64!"}]}, "files[0]"),
        ({"prompt": "a fox", "files": [{"type": "url", "url": "file:///etc/passwd"}]}, "files[0]"),
        ({"prompt": "a fox", "mask": {"type": "file", "data": "AAAA"}}, "mask"),
    ],
)
def test_image_model_refuses_bad_input(server: RunningServer, body: dict[str, Any], param: str) -> None:
    response = httpx.post(
        f"{server.base_url}/image-model",
        json=body,
        headers={"ai-model-id": "bfl/flux-2-klein-4b", "ai-image-model-specification-version": "3"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]"])
def test_image_model_refuses_a_body_that_is_not_a_json_object(server: RunningServer, content: bytes) -> None:
    response = httpx.post(
        f"{server.base_url}/image-model",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("ratio", "size"),
    [("1:1", (1024, 1024)), ("16:9", (1360, 768)), ("9:16", (768, 1360)), ("4:3", (1168, 880))],
)
def test_aspect_ratio_sizes(ratio: str, size: tuple[int, int]) -> None:
    """About one megapixel at the ratio, sides multiples of 16."""
    assert size_for_aspect_ratio(ratio) == size
