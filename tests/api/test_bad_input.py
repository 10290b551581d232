"""Every bad input, answered in the caller's dialect, and the server still serving afterwards.

Four surfaces take the same inputs in their own shapes: OpenAI generations (JSON, references as `images`
data URLs), OpenAI edits (multipart `image`/`image[]` files), Cloudflare Workers AI (multipart fields,
`input_image_N` files) and the Vercel AI Gateway image model (JSON, `files`). Each bad request is checked for
its status and body in that dialect (OpenAI `{"error": {message, type, param, code}}`, Cloudflare
`{"success": false, "errors": [{code, message}]}`, Vercel `{"error": {message, ...}}`), then a good request
in the same dialect must succeed. Reference URLs are served by loopback HTTP servers started here; nothing
leaves the machine.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

import kleinserve.api.app
import kleinserve.media
from kleinserve.api.server import ServerSettings
from kleinserve.engine import Pipeline
from tests.api.conftest import RunningServer, serve_in_thread
from tests.conftest import random_image

OPENAI_GENERATIONS = "/v1/images/generations"
OPENAI_EDITS = "/v1/images/edits"
CLOUDFLARE = "/client/v4/accounts/test/ai/run/@cf/black-forest-labs/flux-2-klein-4b"
VERCEL = "/image-model"
SURFACES = ("openai-generations", "openai-edits", "cloudflare", "vercel")
FAST_S = 1.0  # an answer that needs no decoding or generation comes well within this


# --- reference images -------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def small_png(seed: int = 0) -> bytes:
    return encode(random_image(96, 80, seed))


def bomb_png(side: int = 30000) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of side x side black pixels (900 megapixels), ~110 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytes(1 + (side + 7) // 8) * 1000  # 1000 rows: filter byte 0, then all-zero pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit per pixel, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [random_image(96, 80, seed).convert("P") for seed in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(80 * 96, dtype=np.uint16).reshape(80, 96) * 8).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return encode(image)


@pytest.fixture(scope="module")
def bad_references() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, words the refusal must contain)."""
    whole = encode(random_image(128, 128, 3))
    return {
        "text": (b"this is a text file, not an image\n" * 4, "not a decodable image"),
        "truncated-png": (whole[: len(whole) // 2], "truncated"),
        "over-4-megapixels": (encode(Image.new("RGB", (2100, 2100), (40, 90, 160))), "2100x2100"),
        "decompression-bomb": (bomb_png(), "decompression bomb"),
    }


@pytest.fixture(scope="module")
def good_references() -> dict[str, bytes]:
    return {
        "animated-gif": animated_gif(),
        "cmyk-jpeg": encode(random_image(96, 80, 4, "CMYK"), "JPEG"),
        "16-bit-png": sixteen_bit_png(),
        "palette-png": encode(random_image(96, 80, 5).convert("P")),
        "rgba-png": encode(random_image(96, 80, 6, "RGBA")),
    }


# --- the four surfaces ------------------------------------------------------------------------------------


def reference_param(surface: str, index: int) -> str:
    return {
        "openai-generations": f"images[{index}]",
        "openai-edits": f"image[{index}]",
        "cloudflare": f"input_image_{index}",
        "vercel": f"files[{index}]",
    }[surface]


def base_fields(surface: str) -> dict[str, Any]:
    if surface == "openai-generations":
        return {"prompt": "a red fox", "size": "256x256", "num_inference_steps": 1}
    if surface == "openai-edits":
        return {"prompt": "a red fox", "size": "256x256", "num_inference_steps": "1"}
    if surface == "cloudflare":
        return {"prompt": "a red fox", "width": "256", "height": "256"}
    return {"prompt": "a red fox", "size": "256x256"}


def send(
    client: httpx.Client,
    surface: str,
    changes: dict[str, Any] | None = None,
    references: list[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A request on `surface`: its base fields with `changes` (None removes a field) and `references`
    (edits get one good reference when none is given, since they need one)."""
    fields = base_fields(surface)
    for key, value in (changes or {}).items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    refs = references or []
    if surface == "openai-generations":
        if refs:
            fields["images"] = [f"data:image/png;base64,{base64.b64encode(r).decode()}" for r in refs]
        return client.post(OPENAI_GENERATIONS, json=fields, headers=headers)
    if surface == "openai-edits":
        refs = refs or [small_png()]
        key = "image" if len(refs) == 1 else "image[]"
        files = [(key, (f"ref{i}.png", data, "image/png")) for i, data in enumerate(refs)]
        return client.post(OPENAI_EDITS, data=fields, files=files, headers=headers)
    if surface == "cloudflare":
        parts = [(name, (None, str(value))) for name, value in fields.items()]
        parts += [(f"input_image_{i}", (f"ref{i}.png", data, "image/png")) for i, data in enumerate(refs)]
        return client.post(CLOUDFLARE, files=parts, headers=headers)
    if refs:
        fields["files"] = [
            {"type": "file", "mediaType": "image/png", "data": base64.b64encode(r).decode()} for r in refs
        ]
    return client.post(VERCEL, json=fields, headers=headers)


def image_sizes(surface: str, response: httpx.Response) -> list[tuple[int, int]]:
    """Sizes of the images in a successful response."""
    body = response.json()
    if surface.startswith("openai"):
        encoded = [item["b64_json"] for item in body["data"]]
    elif surface == "cloudflare":
        assert body["success"] is True
        encoded = [body["result"]["image"]]
    else:
        encoded = body["images"]
    return [Image.open(io.BytesIO(base64.b64decode(data))).size for data in encoded]


def assert_ok(surface: str, response: httpx.Response) -> list[tuple[int, int]]:
    assert response.status_code == 200, response.text[:500]
    sizes = image_sizes(surface, response)
    assert sizes
    return sizes


def assert_refused(
    surface: str,
    response: httpx.Response,
    status: int = 400,
    *,
    mentions: tuple[str, ...] = (),
    param: str | None = None,
    code: str | int | None = None,
) -> str:
    """The dialect's error body with `status`; returns the message."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    if surface.startswith("openai"):
        error = body["error"]
        assert set(error) >= {"message", "type", "param", "code"}, error
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param, error
        if code is not None:
            assert error["code"] == code, error
        message = error["message"]
    elif surface == "cloudflare":
        assert body["success"] is False, body
        assert isinstance(body["errors"], list) and len(body["errors"]) == 1, body
        assert body["errors"][0]["code"] == (code or 5006), body
        message = body["errors"][0]["message"]
    else:
        error = body["error"]
        if param is not None:
            assert error.get("param") == param, error
        message = error["message"]
    assert isinstance(message, str) and message
    for words in mentions:
        assert words.lower() in message.lower(), message
    return message


def assert_serving(client: httpx.Client, surface: str) -> None:
    """After a bad request, a good one on the same surface still works."""
    assert_ok(surface, send(client, surface))


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def module_server(
    tmp_path_factory: pytest.TempPathFactory, server_pipeline: Pipeline
) -> Iterator[Callable[..., RunningServer]]:
    """`module_server(**settings)`: like `start_server`, but one server per settings for the whole module."""
    started: dict[str, RunningServer] = {}

    def start(**overrides: Any) -> RunningServer:
        key = repr(sorted(overrides.items()))
        if key not in started:
            data_dir = tmp_path_factory.mktemp("bad-input-data")
            started[key] = serve_in_thread(ServerSettings(data_dir=data_dir, **overrides), server_pipeline)
        return started[key]

    yield start
    for running in started.values():
        running.stop()


# --- prompt, size, n --------------------------------------------------------------------------------------

PROMPT_CASES = {"missing": None, "empty": "", "blank": "   ", "over-32000-characters": "x" * 32001}


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("case", PROMPT_CASES)
def test_bad_prompt(client: httpx.Client, surface: str, case: str) -> None:
    response = send(client, surface, {"prompt": PROMPT_CASES[case]})
    assert_refused(
        surface, response, mentions=("prompt",), param="prompt" if surface != "cloudflare" else None
    )
    assert_serving(client, surface)


def test_prompt_of_32000_characters_is_accepted(client: httpx.Client) -> None:
    assert_ok("openai-generations", send(client, "openai-generations", {"prompt": "a fox " * 5333 + "ab"}))


SIZE_CASES: dict[str, list[tuple[dict[str, Any], str]]] = {
    "openai-generations": [
        ({"size": None, "width": "abc", "height": 256}, "width"),
        ({"size": None, "width": 512.5, "height": 256}, "width"),
        ({"size": None, "width": 100, "height": 256}, "width"),
        ({"size": None, "width": 4000, "height": 256}, "width"),
        ({"size": None, "width": 2048, "height": 1024}, "width"),  # over 1048576 pixels
        ({"size": None, "width": 512}, "width"),  # without height
        ({"size": "abc"}, "size"),
        ({"size": "512.5x512"}, "size"),
        ({"size": "100x256"}, "size"),
        ({"size": "4000x256"}, "size"),
    ],
    "openai-edits": [
        ({"size": None, "width": "abc", "height": "256"}, "width"),
        ({"size": None, "width": "512.5", "height": "256"}, "width"),
        ({"size": None, "width": "100", "height": "256"}, "width"),
        ({"size": None, "width": "4000", "height": "256"}, "width"),
        ({"size": None, "width": "2048", "height": "1024"}, "width"),
        ({"size": "abc"}, "size"),
        ({"size": "512.5x512"}, "size"),
    ],
    "cloudflare": [
        ({"width": "abc"}, "width"),
        ({"width": "512.5"}, "width"),
        ({"width": "2000"}, "width"),
        ({"width": "100"}, "width"),
        ({"height": "2000"}, "height"),
    ],
    "vercel": [
        ({"size": "abc"}, "size"),
        ({"size": "512.5x512"}, "size"),
        ({"size": "100x256"}, "size"),
        ({"size": "4000x256"}, "size"),
    ],
}


@pytest.mark.parametrize(
    ("surface", "changes", "param"),
    [(surface, changes, param) for surface, cases in SIZE_CASES.items() for changes, param in cases],
    ids=[f"{surface}-{changes}" for surface, cases in SIZE_CASES.items() for changes, _ in cases],
)
def test_bad_size(client: httpx.Client, surface: str, changes: dict[str, Any], param: str) -> None:
    response = send(client, surface, changes)
    assert_refused(
        surface, response, mentions=(param,), param=param if surface.startswith("openai") else None
    )
    assert_serving(client, surface)


ROUNDED = {
    "openai-generations": {"size": "300x260"},
    "openai-edits": {"size": "300x260"},
    "cloudflare": {"width": "300", "height": "260"},
    "vercel": {"size": "300x260"},
}


@pytest.mark.parametrize("surface", SURFACES)
def test_size_not_a_multiple_of_16_is_rounded_down(client: httpx.Client, surface: str) -> None:
    response = send(client, surface, ROUNDED[surface])
    assert assert_ok(surface, response) == [(288, 256)]
    if surface.startswith("openai"):
        assert response.json()["size"] == "288x256"


def test_width_and_height_not_multiples_of_16_are_rounded_down(client: httpx.Client) -> None:
    response = send(client, "openai-generations", {"size": None, "width": 300, "height": 270})
    assert assert_ok("openai-generations", response) == [(288, 256)]
    assert response.json()["size"] == "288x256"


N_CASES = [
    ("openai-generations", {"n": 0}, "n"),
    ("openai-generations", {"n": 5}, "n"),
    ("openai-generations", {"num_images": 5}, "num_images"),
    ("openai-edits", {"n": "0"}, "n"),
    ("openai-edits", {"n": "5"}, "n"),
    ("vercel", {"n": 0}, "n"),
    ("vercel", {"n": 5}, "n"),
]


@pytest.mark.parametrize(("surface", "changes", "param"), N_CASES)
def test_n_out_of_range(client: httpx.Client, surface: str, changes: dict[str, Any], param: str) -> None:
    response = send(client, surface, changes)
    assert_refused(surface, response, mentions=(param,), param=param)
    assert_serving(client, surface)


# --- reference images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_more_than_four_references(client: httpx.Client, surface: str) -> None:
    response = send(client, surface, references=[small_png(seed) for seed in range(5)])
    assert_refused(surface, response, mentions=("at most 4",))
    assert_serving(client, surface)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("kind", ["text", "truncated-png", "over-4-megapixels", "decompression-bomb"])
def test_bad_reference_is_refused_naming_it(
    client: httpx.Client, bad_references: dict[str, tuple[bytes, str]], surface: str, kind: str
) -> None:
    data, words = bad_references[kind]
    started = time.monotonic()
    response = send(client, surface, references=[small_png(), data])
    elapsed = time.monotonic() - started
    param = reference_param(surface, 1)
    assert_refused(surface, response, mentions=(param, words))
    if kind == "decompression-bomb":
        assert elapsed < FAST_S  # refused from its header, before 900 megapixels are decoded
    assert_serving(client, surface)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("kind", ["animated-gif", "cmyk-jpeg", "16-bit-png", "palette-png", "rgba-png"])
def test_unusual_reference_is_accepted(
    client: httpx.Client, good_references: dict[str, bytes], surface: str, kind: str
) -> None:
    assert_ok(surface, send(client, surface, references=[good_references[kind]]))


# --- bodies -----------------------------------------------------------------------------------------------


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    """A multipart body and its Content-Type, to send with any framing."""
    request = httpx.Request(
        "POST",
        "http://x/",
        data=fields,
        files={name: (f"{name}.png", data, "image/png") for name, data in files.items()},
    )
    return request.read(), request.headers["content-type"]


def _oversized(surface: str, size: int) -> tuple[str, bytes, str]:
    """(path, body, content type) of a body of about `size` bytes on `surface`."""
    filler = "x" * size
    if surface == "openai-generations":
        return OPENAI_GENERATIONS, json.dumps({"prompt": filler}).encode(), "application/json"
    if surface == "vercel":
        return VERCEL, json.dumps({"prompt": filler}).encode(), "application/json"
    path = OPENAI_EDITS if surface == "openai-edits" else CLOUDFLARE
    file_field = "image" if surface == "openai-edits" else "input_image_0"
    body, content_type = _multipart({"prompt": "a red fox"}, {file_field: filler.encode()})
    return path, body, content_type


PAYLOAD_CODES: dict[str, str | int] = {
    "openai-generations": "payload_too_large",
    "openai-edits": "payload_too_large",
    "cloudflare": 3006,
    "vercel": "payload_too_large",
}


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_the_limit_is_413(
    module_server: Callable[..., RunningServer], surface: str, framing: str
) -> None:
    running = module_server(max_body_bytes=1_000_000)
    path, body, content_type = _oversized(surface, 1_200_000)
    content: bytes | Iterator[bytes] = body
    if framing == "chunked":  # no Content-Length: counted while it streams in
        content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    with httpx.Client(base_url=running.base_url, timeout=60) as http:
        response = http.post(path, content=content, headers={"content-type": content_type})
        code = PAYLOAD_CODES[surface] if surface != "vercel" else None
        assert_refused(surface, response, 413, mentions=("limit",), code=code)
        assert_serving(http, surface)


def test_default_body_limit_is_50_mb() -> None:
    assert kleinserve.api.app.MAX_BODY_BYTES == 50 * 1024 * 1024


def _raw_post(base_url: str, path: str, head_lines: list[str]) -> tuple[int, dict[str, Any]]:
    """Send only a request head (no body) and read the answer: it must come without the body."""
    address = urlsplit(base_url)
    head = "\r\n".join([f"POST {path} HTTP/1.1", f"Host: {address.netloc}", *head_lines, "", ""])
    with socket.create_connection((address.hostname, address.port), timeout=5) as connection:
        connection.sendall(head.encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(65536)
        head_part, _, rest = received.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head_part.decode().split("\r\n")[1:] if ": " in line)
        length = int({k.lower(): v for k, v in headers.items()}["content-length"])
        while len(rest) < length:
            rest += connection.recv(65536)
    return int(head_part.split(b" ")[1]), json.loads(rest)


@pytest.mark.parametrize("surface", SURFACES)
def test_declared_length_over_the_default_limit_is_refused_before_the_body(
    server: RunningServer, client: httpx.Client, surface: str
) -> None:
    path = {
        "openai-generations": OPENAI_GENERATIONS,
        "openai-edits": OPENAI_EDITS,
        "cloudflare": CLOUDFLARE,
        "vercel": VERCEL,
    }[surface]
    content_type = (
        "application/json" if surface in ("openai-generations", "vercel") else "multipart/form-data"
    )
    declared = kleinserve.api.app.MAX_BODY_BYTES + 1
    status, body = _raw_post(
        server.base_url, path, [f"Content-Type: {content_type}; boundary=x", f"Content-Length: {declared}"]
    )
    assert status == 413
    if surface == "cloudflare":
        assert body["errors"][0]["code"] == 3006
    else:
        assert body["error"]["message"] == f"request body is {declared} bytes; the limit is 52428800 bytes"
    assert_serving(client, surface)


@pytest.mark.parametrize("surface", ["openai-generations", "vercel"])
def test_malformed_json(client: httpx.Client, surface: str) -> None:
    path = OPENAI_GENERATIONS if surface == "openai-generations" else VERCEL
    response = client.post(
        path, content=b'{"prompt": "a fox", ', headers={"content-type": "application/json"}
    )
    assert_refused(surface, response, mentions=("json",))
    assert_serving(client, surface)


@pytest.mark.parametrize("surface", ["openai-generations", "vercel"])
def test_json_that_is_not_an_object(client: httpx.Client, surface: str) -> None:
    path = OPENAI_GENERATIONS if surface == "openai-generations" else VERCEL
    response = client.post(path, json=["a fox"])
    assert_refused(surface, response, mentions=("object",))
    assert_serving(client, surface)


def test_form_data_to_generations(client: httpx.Client) -> None:
    response = client.post(
        OPENAI_GENERATIONS, data={"prompt": "a fox"}, files={"image": ("a.png", small_png())}
    )
    assert_refused("openai-generations", response, mentions=("json",))
    assert_serving(client, "openai-generations")


def test_json_to_edits(client: httpx.Client) -> None:
    response = client.post(OPENAI_EDITS, json={"prompt": "a fox"})
    assert_refused("openai-edits", response, mentions=("multipart",))
    assert_serving(client, "openai-edits")


def test_json_to_cloudflare(client: httpx.Client) -> None:
    response = client.post(CLOUDFLARE, json={"prompt": "a fox"})
    assert_refused("cloudflare", response, mentions=("multipart",))
    assert_serving(client, "cloudflare")


def test_edits_without_an_image(client: httpx.Client) -> None:
    response = client.post(OPENAI_EDITS, files={"prompt": (None, "a fox")})
    assert_refused("openai-edits", response, mentions=("no image",), param="image")
    assert_serving(client, "openai-edits")


# --- models -----------------------------------------------------------------------------------------------


def test_unknown_model_openai(client: httpx.Client) -> None:
    for surface in ("openai-generations", "openai-edits"):
        response = send(client, surface, {"model": "dall-e-3"})
        message = assert_refused(surface, response, 404, param="model", code="model_not_found")
        assert "dall-e-3" in message and "flux-2-klein-4b" in message  # says what is served
        assert_serving(client, surface)


def test_unknown_model_cloudflare(client: httpx.Client) -> None:
    response = client.post(
        "/client/v4/accounts/test/ai/run/@cf/meta/llama-3-8b", files={"prompt": (None, "x")}
    )
    assert_refused("cloudflare", response, 400, mentions=("@cf/meta/llama-3-8b",), code=5007)
    assert_serving(client, "cloudflare")


def test_unknown_model_vercel(client: httpx.Client) -> None:
    response = send(client, "vercel", headers={"ai-model-id": "openai/dall-e-3"})
    assert_refused("vercel", response, 404, mentions=("openai/dall-e-3",), param="model")
    assert response.json()["error"]["type"] == "model_not_found"
    assert_serving(client, "vercel")


# --- reference URLs ---------------------------------------------------------------------------------------


@dataclass
class ImageHost:
    """A loopback HTTP server for reference URLs: /ref.png, /nolength.png (no Content-Length),
    /slow.png (answers after `slow_s`), /trickle.png (a byte every 0.2 s), /redirect; 404 otherwise."""

    png: bytes
    slow_s: float = 3.0
    requests: list[str] = field(default_factory=list)
    base_url: str = ""

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server under test gave up (timeout, size cap), as it should

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                host.requests.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/ref.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path not in ("/ref.png", "/nolength.png", "/slow.png", "/trickle.png"):
                    self.send_error(404)
                    return
                if self.path == "/slow.png":
                    time.sleep(host.slow_s)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if self.path == "/nolength.png":
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(len(host.png)))
                self.end_headers()
                if self.path == "/trickle.png":
                    for byte in host.png[:20]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                self.wfile.write(host.png)

        return Handler


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost(small_png(7))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), host.handler())
    httpd.daemon_threads = True
    host.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield host
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def send_url(client: httpx.Client, surface: str, url: str) -> httpx.Response:
    if surface == "openai-generations":
        return client.post(OPENAI_GENERATIONS, json={**base_fields(surface), "images": [url]})
    return client.post(VERCEL, json={**base_fields(surface), "files": [{"type": "url", "url": url}]})


URL_SURFACES = ("openai-generations", "vercel")


@pytest.fixture
def no_outbound_http(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and blocks) every request the server's fetcher would send: it must send none."""
    attempts: list[str] = []

    async def refuse(self: httpx.AsyncClient, request: httpx.Request, **_: Any) -> httpx.Response:
        attempts.append(str(request.url))
        raise httpx.ConnectError("blocked by the test", request=request)

    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)
    return attempts


@pytest.mark.parametrize("surface", URL_SURFACES)
@pytest.mark.parametrize("url", ["ftp://127.0.0.1/ref.png", "file:///etc/passwd", "gopher://127.0.0.1/"])
def test_url_with_another_scheme_is_refused(
    client: httpx.Client, no_outbound_http: list[str], surface: str, url: str
) -> None:
    response = send_url(client, surface, url)
    assert_refused(surface, response, mentions=(reference_param(surface, 0), "scheme"))
    assert no_outbound_http == []
    assert_serving(client, surface)


PRIVATE_URLS = [
    "http://localhost/ref.png",
    "http://10.0.0.1/ref.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/ref.png",
    "http://0.0.0.0/ref.png",
    "http://2130706433/ref.png",  # 127.0.0.1 as one number
    "HTTP://LOCALHOST/ref.png",
]


@pytest.mark.parametrize("surface", URL_SURFACES)
@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_url_is_refused_before_connecting(
    client: httpx.Client, no_outbound_http: list[str], surface: str, url: str
) -> None:
    started = time.monotonic()
    response = send_url(client, surface, url)
    assert_refused(surface, response, mentions=(reference_param(surface, 0), "private or loopback"))
    assert time.monotonic() - started < FAST_S
    assert no_outbound_http == []  # checked before any connection was attempted
    assert_serving(client, surface)


@pytest.mark.parametrize("surface", URL_SURFACES)
def test_loopback_url_is_refused_and_never_fetched(
    client: httpx.Client, image_host: ImageHost, surface: str
) -> None:
    """The real thing, no interception: the loopback host would serve the image, and sees no request."""
    before = len(image_host.requests)
    response = send_url(client, surface, image_host.base_url + "/ref.png")
    assert_refused(surface, response, mentions=("private or loopback", "127.0.0.1"))
    assert len(image_host.requests) == before
    assert_serving(client, surface)


@pytest.fixture
def private_server(
    module_server: Callable[..., RunningServer],
) -> Iterator[tuple[RunningServer, httpx.Client]]:
    running = module_server(allow_private_urls=True)
    with httpx.Client(base_url=running.base_url, timeout=60) as http:
        yield running, http


@pytest.mark.parametrize("surface", URL_SURFACES)
@pytest.mark.parametrize("path", ["/ref.png", "/nolength.png"])
def test_loopback_url_works_when_private_urls_are_allowed(
    private_server: tuple[RunningServer, httpx.Client], image_host: ImageHost, surface: str, path: str
) -> None:
    _, http = private_server
    response = send_url(http, surface, image_host.base_url + path)
    assert_ok(surface, response)
    assert path in image_host.requests


def test_signed_media_url_of_the_server_itself_works_as_a_reference(
    private_server: tuple[RunningServer, httpx.Client],
) -> None:
    _, http = private_server
    made = http.post(OPENAI_GENERATIONS, json={**base_fields("openai-generations"), "response_format": "url"})
    assert made.status_code == 200, made.text
    url = made.json()["data"][0]["url"]
    for surface in URL_SURFACES:
        assert_ok(surface, send_url(http, surface, url))


@pytest.mark.parametrize("surface", URL_SURFACES)
def test_url_answering_404_is_400(
    private_server: tuple[RunningServer, httpx.Client], image_host: ImageHost, surface: str
) -> None:
    _, http = private_server
    response = send_url(http, surface, image_host.base_url + "/missing.png")
    assert_refused(surface, response, mentions=(reference_param(surface, 0), "HTTP 404"))
    assert_serving(http, surface)


def test_redirects_are_not_followed(
    private_server: tuple[RunningServer, httpx.Client], image_host: ImageHost
) -> None:
    """A redirect could lead anywhere, past the address check: it is an error, not followed."""
    _, http = private_server
    before = list(image_host.requests)
    response = send_url(http, "openai-generations", image_host.base_url + "/redirect")
    assert_refused("openai-generations", response, mentions=("HTTP 302",))
    assert image_host.requests[len(before) :] == ["/redirect"]


@pytest.mark.parametrize("path", ["/slow.png", "/trickle.png"])
def test_url_slower_than_the_timeout_is_400(
    private_server: tuple[RunningServer, httpx.Client],
    image_host: ImageHost,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """Slow to answer, or answering a byte at a time: either way the whole download has 0.5 s."""
    monkeypatch.setattr(kleinserve.media, "URL_TIMEOUT_S", 0.5)
    _, http = private_server
    for surface in URL_SURFACES:
        started = time.monotonic()
        response = send_url(http, surface, image_host.base_url + path)
        assert time.monotonic() - started < 2.0  # /slow.png takes 3 s, /trickle.png 4 s
        assert_refused(surface, response, mentions=(reference_param(surface, 0),))
        assert "longer than 0.5 s" in response.text or "Timeout" in response.text
        assert_serving(http, surface)


@pytest.mark.parametrize("path", ["/ref.png", "/nolength.png"])
def test_url_body_over_the_size_cap_is_400(
    private_server: tuple[RunningServer, httpx.Client],
    image_host: ImageHost,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    monkeypatch.setattr(kleinserve.media, "URL_MAX_BYTES", 1000)
    assert len(image_host.png) > 1000
    _, http = private_server
    for surface in URL_SURFACES:
        response = send_url(http, surface, image_host.base_url + path)
        assert_refused(surface, response, mentions=(reference_param(surface, 0), "larger than 1000 bytes"))
        assert_serving(http, surface)


# --- what only a parser sees: nesting, huge numbers, lone surrogates, non-finite ratios --------------------

BFL = "/v1/flux-2-klein-4b"
JSON_PATHS = {"openai-generations": OPENAI_GENERATIONS, "vercel": VERCEL, "bfl": BFL}
BFL_FIELDS = {"prompt": "a red fox", "width": 256, "height": 256}


def post_json_text(client: httpx.Client, surface: str, text: str) -> httpx.Response:
    """`text` sent as the JSON body as it is: values json.dumps cannot write (lone surrogates, NaN)."""
    return client.post(
        JSON_PATHS[surface], content=text.encode(), headers={"content-type": "application/json"}
    )


def with_field(surface: str, name: str, value_text: str) -> str:
    """The surface's good JSON fields with `name` set to the raw JSON `value_text`."""
    fields = BFL_FIELDS if surface == "bfl" else base_fields(surface)
    rest = json.dumps({key: value for key, value in fields.items() if key != name})
    return f'{{"{name}": {value_text}, {rest[1:]}'


def assert_json_refused(surface: str, response: httpx.Response, *, mentions: tuple[str, ...] = ()) -> None:
    """Refused in the dialect: BFL's 422 `{"detail": [{loc, msg, type}]}`, the others' 400 `{"error"}`."""
    if surface != "bfl":
        assert_refused(surface, response, mentions=mentions)
        return
    assert response.status_code == 422, response.text[:500]
    [detail] = response.json()["detail"]
    assert set(detail) == {"loc", "msg", "type"}, detail
    for words in mentions:
        assert words.lower() in detail["msg"].lower(), detail


def assert_json_serving(client: httpx.Client, surface: str) -> None:
    if surface != "bfl":
        assert_serving(client, surface)
        return
    accepted = client.post(BFL, json=BFL_FIELDS)  # asynchronous: accepted and queued is serving
    assert accepted.status_code == 200 and accepted.json()["polling_url"], accepted.text[:500]


@pytest.mark.parametrize("surface", JSON_PATHS)
def test_json_nested_100000_deep_is_refused(client: httpx.Client, surface: str) -> None:
    """Python's json module answered a RecursionError (500); over 1024 levels is malformed here."""
    nested = "[" * 100_000 + "]" * 100_000
    response = post_json_text(client, surface, with_field(surface, "extra", nested))
    assert_json_refused(surface, response, mentions=("malformed json", "depth"))
    assert_json_serving(client, surface)


@pytest.mark.parametrize("surface", JSON_PATHS)
def test_integer_of_5000_digits_is_refused(client: httpx.Client, surface: str) -> None:
    """Past Python's 4300-digit int-from-string limit json.loads raised a ValueError (500)."""
    response = post_json_text(client, surface, with_field(surface, "seed", "9" * 5000))
    assert_json_refused(surface, response, mentions=("malformed json",))
    assert_json_serving(client, surface)


@pytest.mark.parametrize("surface", JSON_PATHS)
def test_lone_surrogate_in_a_json_prompt_is_refused(client: httpx.Client, surface: str) -> None:
    """'\\ud800' is valid JSON text for Python's json module, but no Unicode string: the store, the tokenizer
    and every JSON writer refused it later (500 for Vercel)."""
    response = post_json_text(client, surface, with_field(surface, "prompt", '"a fox \\ud800"'))
    assert_json_refused(surface, response, mentions=("malformed json", "surrogate"))
    assert_json_serving(client, surface)


def test_lone_surrogate_in_a_bfl_webhook_secret_is_refused(client: httpx.Client) -> None:
    text = with_field("bfl", "webhook_secret", '"\\udc00"')
    text = text[:-1] + ', "webhook_url": "https://example.com/hook"}'
    response = post_json_text(client, "bfl", text)
    assert_json_refused("bfl", response, mentions=("surrogate",))
    assert_json_serving(client, "bfl")


def test_lone_surrogate_in_a_multipart_prompt_is_refused(client: httpx.Client) -> None:
    """Multipart fields are decoded in the charset the Content-Type names; UTF-7's "+2AA-" is U+D800 alone.
    (OpenAI edits read the same way, service.read_form; pydantic refused such a prompt there already.)"""
    fields = {**base_fields("cloudflare"), "prompt": "+2AA-"}
    body, content_type = _multipart(fields, {"input_image_0": small_png()})
    response = client.post(
        CLOUDFLARE, content=body, headers={"content-type": f"{content_type}; charset=utf-7"}
    )
    assert_refused("cloudflare", response, mentions=("prompt", "unicode"))
    assert_serving(client, "cloudflare")


@pytest.mark.parametrize("files", [5, True, 0.5])
def test_vercel_files_that_is_not_a_list_is_refused(client: httpx.Client, files: object) -> None:
    response = send(client, "vercel", {"files": files})
    assert_refused("vercel", response, mentions=("files", "array"), param="files")
    assert_serving(client, "vercel")


@pytest.mark.parametrize("ratio", ["NaN:1", "1:nan", "Infinity:Infinity"])
def test_vercel_aspect_ratio_that_is_not_finite_is_refused(client: httpx.Client, ratio: str) -> None:
    response = send(client, "vercel", {"size": None, "aspectRatio": ratio})
    assert_refused("vercel", response, mentions=("aspectRatio",), param="aspectRatio")
    assert_serving(client, "vercel")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_literals_are_refused(client: httpx.Client, literal: str) -> None:
    """Not JSON; Python's json module read them as floats."""
    response = post_json_text(client, "vercel", with_field("vercel", "n", literal))
    assert_refused("vercel", response, mentions=("malformed json",))
    assert_serving(client, "vercel")
