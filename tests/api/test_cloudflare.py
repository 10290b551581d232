"""Cloudflare Workers AI dialect, driven by the real curl binary the way Cloudflare's docs show it for
`@cf/black-forest-labs/flux-2-klein-4b`, pointed at the loopback server: only host and token change.

`test_docs_example_verbatim` runs the model page's command as printed (developers.cloudflare.com/workers-ai/
models/flux-2-klein-4b/: `--request POST --url ... --header 'Authorization: Bearer {TOKEN}' --header
'Content-Type: multipart/form-data' --form 'prompt=a sunset at the alps' --form steps=25 --form width=1024
--form height=1024`). The other tests use the short form `curl URL -X POST -H "Authorization: Bearer T"
--form ...` at 256 px, for speed.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kleinserve.api.auth import SqliteKeyStore
from kleinserve.api.server import ServerSettings
from kleinserve.engine import load_pipeline
from tests.api.conftest import RunningServer, serve_in_thread
from tests.conftest import max_difference, random_image, random_png_files

CURL = "/usr/bin/curl"
ACCOUNT_ID = "023e105f4ecef8ad9ca31a8372d0c353"  # the shape of a Cloudflare account id: 32 hex digits
TOKEN = "cf-api-token"  # the test server has no keys, so any token passes
MODEL = "@cf/black-forest-labs/flux-2-klein-4b"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def curl_binary() -> None:
    if not Path(CURL).is_file():
        pytest.fail(f"these tests run the real curl binary at {CURL}; install it (apt-get install curl)")


def account_url(server: RunningServer, model: str = MODEL) -> str:
    return f"{server.base_url}/client/v4/accounts/{ACCOUNT_ID}/ai/run/{model}"


def short_url(server: RunningServer, model: str = MODEL) -> str:
    return f"{server.base_url}/ai/run/{model}"


def curl(
    url: str, *forms: str, extra: tuple[str, ...] = (), token: str = TOKEN
) -> tuple[int, dict[str, Any]]:
    """`curl URL -X POST -H "Authorization: Bearer T" --form F ...`; returns (HTTP status, JSON body)."""
    command = [CURL, url, "-X", "POST", "-H", f"Authorization: Bearer {token}", *extra]
    for form in forms:
        command += ["--form", form]
    command += ["--silent", "--show-error", "--write-out", "\n%{http_code}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"curl exited {done.returncode}: {done.stderr}"
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


def image_of(body: dict[str, Any]) -> tuple[bytes, Image.Image]:
    """The success envelope, checked field by field; returns the PNG bytes and the decoded image."""
    assert set(body) == {"result", "success", "errors", "messages"}, body.keys()
    assert body["success"] is True
    assert body["errors"] == [] and body["messages"] == []
    assert set(body["result"]) == {"image"}
    png = base64.b64decode(body["result"]["image"], validate=True)
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    return png, image


def generate(url: str, *forms: str) -> tuple[bytes, Image.Image]:
    status, body = curl(url, *forms)
    assert status == 200, body
    return image_of(body)


def assert_error(status: int, body: dict[str, Any], code: int, http_status: int) -> str:
    """Cloudflare's failure envelope; returns the message."""
    assert status == http_status, body
    assert body["success"] is False
    assert body["result"] == {} and body["messages"] == []
    assert len(body["errors"]) == 1, body["errors"]
    error = body["errors"][0]
    assert set(error) == {"code", "message"}
    assert isinstance(error["code"], int) and error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four small distinct PNG files to send as input_image_0 .. input_image_3."""
    return random_png_files(tmp_path_factory.mktemp("cloudflare-references"), 4, 128, seed=100)


def test_docs_example_verbatim(server: RunningServer) -> None:
    """The docs' command as printed: 1024x1024; steps=25 is ignored, as on Cloudflare (klein is distilled)."""
    command = [
        CURL,
        "--request",
        "POST",
        "--url",
        account_url(server),
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--header",
        "Content-Type: multipart/form-data",
        "--form",
        "prompt=a sunset at the alps",
        "--form",
        "steps=25",
        "--form",
        "width=1024",
        "--form",
        "height=1024",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    _, image = image_of(json.loads(done.stdout))
    assert image.format == "PNG"
    assert image.size == (1024, 1024)


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """What `kleinserve serve` without --model serves: the embedded toy, trained at 128-256 px."""
    toy = load_pipeline("flux-2-klein-toy", dtype="float32")
    running = serve_in_thread(ServerSettings(data_dir=tmp_path_factory.mktemp("toy-data")), toy)
    yield running
    running.stop()


def test_without_a_size_a_klein_sized_model_makes_cloudflares_1024x768(server: RunningServer) -> None:
    assert server.pipeline.spec.default_side == 1024  # the tiny model declares klein's own default
    _, image = generate(short_url(server), "prompt=a sunset at the alps", "seed=3")
    assert image.size == (1024, 768)


def test_without_a_size_a_smaller_model_keeps_4_3_at_its_own_side(toy_server: RunningServer) -> None:
    """The toy's default side is 256: 256x192, not a smeared 1024x768. The 256-1920 bounds still apply to
    sizes a client sends."""
    assert toy_server.pipeline.spec.default_side == 256
    _, image = generate(short_url(toy_server), "prompt=a red circle on a white background", "seed=3")
    assert image.size == (256, 192)
    _, given = generate(short_url(toy_server), "prompt=a red circle", "width=256", "height=256", "seed=3")
    assert given.size == (256, 256)
    status, body = curl(short_url(toy_server), "prompt=a red circle", "width=192", "height=192")
    assert "width 192 is out of range" in assert_error(status, body, 5006, 400)


def test_short_form_with_size_and_seed(server: RunningServer) -> None:
    png, image = generate(
        account_url(server), "prompt=a sunset at the alps", "width=320", "height=256", "seed=11"
    )
    assert image.size == (320, 256)
    assert image.mode == "RGB"


def test_same_seed_same_bytes(server: RunningServer) -> None:
    forms = ("prompt=a sunset at the alps", "width=256", "height=256")
    first, _ = generate(account_url(server), *forms, "seed=42")
    second, _ = generate(account_url(server), *forms, "seed=42")
    other, _ = generate(account_url(server), *forms, "seed=43")
    assert first == second
    assert other != first


def test_both_route_forms_give_the_same_image(server: RunningServer) -> None:
    forms = ("prompt=a lighthouse", "width=256", "height=256", "seed=5")
    with_account, _ = generate(account_url(server), *forms)
    short, _ = generate(short_url(server), *forms)
    assert with_account == short


def test_input_images_change_the_output(server: RunningServer, references: list[Path]) -> None:
    """input_image_0 .. input_image_3 as binary file parts; each one given changes the result. BFL's name
    `input_image` is not a Workers AI field and is ignored, as Cloudflare does."""
    base = ("prompt=the same scene in winter", "width=256", "height=256", "seed=9")
    parts = [f"input_image_{i}=@{path}" for i, path in enumerate(references)]
    plain, _ = generate(short_url(server), *base)
    one, _ = generate(short_url(server), *base, parts[0])
    three, _ = generate(short_url(server), *base, *parts[:3])
    four, image = generate(short_url(server), *base, *parts)
    again, _ = generate(short_url(server), *base, *parts)
    assert len({plain, one, three, four}) == 4
    assert four == again
    assert image.size == (256, 256)
    ignored, _ = generate(short_url(server), *base, f"input_image=@{references[0]}")
    assert ignored == plain


def test_input_images_order_matters(server: RunningServer, references: list[Path]) -> None:
    base = ("prompt=combine these", "width=256", "height=256", "seed=9")
    forward, _ = generate(
        short_url(server), *base, f"input_image_0=@{references[0]}", f"input_image_1=@{references[1]}"
    )
    swapped, _ = generate(
        short_url(server), *base, f"input_image_0=@{references[1]}", f"input_image_1=@{references[0]}"
    )
    assert forward != swapped


def test_large_input_image_file_part(server: RunningServer, tmp_path: Path) -> None:
    """A reference over 1 MB (multipart parts that size are spooled to a temporary file on disk)."""
    path = tmp_path / "large.png"
    random_image(600, 600, seed=3).save(path)
    assert path.stat().st_size > 1024 * 1024
    _, image = generate(
        short_url(server), "prompt=a sunset", "width=256", "height=256", "seed=1", f"input_image_0=@{path}"
    )
    assert image.size == (256, 256)


def test_json_object_prompt_is_passed_through(server: RunningServer) -> None:
    """A JSON object given as the prompt (FLUX.2's structured prompting) reaches the model as that text:
    the image equals the one the OpenAI route makes for the same text and seed."""
    prompt = json.dumps(
        {"scene": "a sunset at the alps", "style": "watercolor", "color_palette": ["#ff7f50", "#1e90ff"]}
    )
    png, image = generate(short_url(server), f"prompt={prompt}", "width=256", "height=256", "seed=21")
    plain, _ = generate(
        short_url(server), "prompt=a sunset at the alps", "width=256", "height=256", "seed=21"
    )
    assert png != plain
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": prompt, "size": "256x256", "seed": 21, "model": "flux-2-klein-4b"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    expected = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert max_difference(image, expected) == 0


def test_missing_prompt(server: RunningServer) -> None:
    status, body = curl(account_url(server), "width=256", "height=256")
    message = assert_error(status, body, 5006, 400)
    assert message.startswith("AiError: Bad input:")
    assert "prompt" in message


def test_width_out_of_range(server: RunningServer) -> None:
    status, body = curl(account_url(server), "prompt=a sunset", "width=100", "height=256")
    message = assert_error(status, body, 5006, 400)
    assert "width" in message and "256-1920" in message


def test_height_not_an_integer(server: RunningServer) -> None:
    status, body = curl(account_url(server), "prompt=a sunset", "width=256", "height=tall")
    message = assert_error(status, body, 5006, 400)
    assert "height" in message


@pytest.mark.parametrize(
    "model", ["@cf/black-forest-labs/flux-2-dev", "@cf/black-forest-labs/flux-2-klein-9b", "nonsense"]
)
def test_unknown_model_path(server: RunningServer, model: str) -> None:
    status, body = curl(account_url(server, model), "prompt=a sunset", "width=256", "height=256")
    message = assert_error(status, body, 5007, 400)
    assert model in message


def test_json_body_instead_of_multipart(server: RunningServer) -> None:
    """Cloudflare answers a JSON body for this model with "required properties at '/' are 'multipart'"."""
    done = subprocess.run(
        [
            CURL,
            account_url(server),
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "-H",
            "Content-Type: application/json",
            "--data",
            json.dumps({"prompt": "a sunset at the alps", "width": 256, "height": 256}),
            "--silent",
            "--show-error",
            "--write-out",
            "\n%{http_code}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, status = done.stdout.rpartition("\n")
    message = assert_error(int(status), json.loads(body), 5006, 400)
    assert "multipart" in message


def test_non_image_file_as_input_image(server: RunningServer, tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image\n")
    status, body = curl(
        short_url(server), "prompt=a sunset", "width=256", "height=256", f"input_image_0=@{text_file}"
    )
    message = assert_error(status, body, 5006, 400)
    assert "input_image_0" in message


def test_malformed_multipart_body_is_bad_input(server: RunningServer) -> None:
    """The framework's own 400 for an unparseable body is still Cloudflare's bad-input error."""
    status, body = curl(
        short_url(server),
        extra=("-H", "Content-Type: multipart/form-data; boundary=xyz", "--data", "not multipart at all"),
    )
    assert_error(status, body, 5006, 400)


def test_unknown_route_under_the_cloudflare_prefix(server: RunningServer) -> None:
    status, body = curl(f"{server.base_url}/client/v4/accounts/{ACCOUNT_ID}/ai/models/search")
    assert_error(status, body, 7000, 404)


def test_api_token(start_server: Callable[..., RunningServer]) -> None:
    """With a key created, the Bearer token is checked: a wrong one is Cloudflare's 10000 / 401."""
    running = start_server()
    keys = SqliteKeyStore(running.settings.data_dir / "kleinserve.db")
    try:
        token = keys.create("cloudflare-client")
    finally:
        keys.close()
    forms = ("prompt=a sunset at the alps", "width=256", "height=256")
    status, body = curl(account_url(running), *forms, token="not-the-key")
    assert_error(status, body, 10000, 401)
    status, body = curl(account_url(running), *forms, token=token)
    assert status == 200, body
    image_of(body)
