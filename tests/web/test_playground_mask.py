"""The playground's mask painter (issue 18), in headless Chromium against a live kleinserve: a mask drawn
with the mouse over the first reference goes out as the BFL body's `image_prompt` + `mask` (white = repaint)
+ `strength`, and comes back as an image of the reference's size with the mask on its card; the eraser and
"Clear mask" remove paint, and a mask with no paint left is not sent; a new first reference drops a mask
painted on the old one; the copy-as code sends the downloaded mask (OpenAI's form) in each client's way.

Masks are read back from what the page actually sent or saved, as images: the stroke's pixels are painted and
the rest is not.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from playwright.sync_api import Page, Request, expect

from tests.api.conftest import RunningServer
from tests.conftest import random_image
from tests.web.test_playground import PROMPT, generate, loaded_size, results, show_snippet
from tests.web.test_playground_loras import run_node

WIDTH, HEIGHT = 128, 96  # the image edited: a multiple of 16 each way, not square
MID = HEIGHT // 2  # the row each stroke runs along


def reference_file(folder: Path, name: str = "scene.png", seed: int = 4) -> Path:
    path = folder / name
    random_image(WIDTH, HEIGHT, seed=seed).save(path)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def decoded(url: str) -> Image.Image:
    """The image of a base64 data URL."""
    header, _, payload = url.partition(",")
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def open_painter(page: Page, server: RunningServer, *references: Path) -> None:
    page.goto(server.base_url + "/")
    page.set_input_files("#ref-input", [str(path) for path in references])
    page.get_by_role("button", name="Paint mask").click()
    expect(page.get_by_role("button", name="Paint mask")).to_have_attribute("aria-pressed", "true")
    # The canvas takes the image's own pixel size once the image has loaded.
    expect(page.locator("#mask-canvas")).to_have_js_property("width", WIDTH)


def stroke(page: Page, start: float, end: float, brush: int = 40) -> None:
    """Drags the mouse along the image's middle row from `start` to `end` (fractions of its width) with a
    brush `brush` screen pixels across: a real mouse down, moves and up on the canvas."""
    page.get_by_label("Brush size").fill(str(brush))
    canvas = page.get_by_label("Mask: paint what to repaint")
    box = canvas.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] * (MID + 0.5) / HEIGHT
    page.mouse.move(box["x"] + box["width"] * start, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end, y, steps=8)
    page.mouse.up()


def painted_columns(mask: Image.Image) -> list[int]:
    """The columns of the middle row that a BFL mask repaints (white: >= 128)."""
    assert mask.size == (WIDTH, HEIGHT)
    grey = mask.convert("L")
    return [x for x in range(WIDTH) if grey.getpixel((x, MID)) >= 128]


def painted_rows(mask: Image.Image) -> set[int]:
    grey = mask.convert("L")
    return {y for y in range(HEIGHT) for x in range(WIDTH) if grey.getpixel((x, y)) >= 128}


@contextmanager
def submitted(page: Page) -> Iterator[list[Request]]:
    """The BFL submissions the page makes while the block runs (they go on to the server)."""
    requests: list[Request] = []

    def record(request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/v1/flux-2-klein-4b"):
            requests.append(request)

    page.on("request", record)
    yield requests
    page.remove_listener("request", record)


def job_of(server: RunningServer, submission: Request) -> dict[str, Any]:
    """GET /v1/jobs/{id} of a finished submission: what the server recorded and made."""
    response = submission.response()
    assert response is not None and response.ok, response
    answer = httpx.get(f"{server.base_url}/v1/jobs/{response.json()['id']}", timeout=30)
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (WIDTH, HEIGHT)
        return image.convert("RGB").tobytes()


def test_painted_mask_is_sent_and_shown(page: Page, server: RunningServer, tmp_path: Path) -> None:
    scene, other = reference_file(tmp_path), reference_file(tmp_path, "other.png", seed=5)
    open_painter(page, server, scene, other)
    strength = page.get_by_label("Strength")
    expect(strength).to_be_hidden()  # nothing painted yet
    stroke(page, 0.25, 0.75)
    expect(strength).to_be_visible()
    expect(strength).to_have_value("1")
    strength.fill("0.6")
    expect(page.locator("#strength-value")).to_have_text("0.60")
    expect(page.locator("#size")).to_be_disabled()  # the output has the edited image's size

    with submitted(page) as submissions:
        page.fill("#prompt", "a blue circle")
        page.click("#generate")
        expect(results(page)).to_have_count(1)
    (submission,) = submissions
    body = submission.post_data_json
    assert body["image_prompt"] == data_url(scene)  # the first reference is the image edited
    assert body["input_image"] == data_url(other)  # the others move up
    assert "input_image_2" not in body and "width" not in body and "height" not in body
    assert body["strength"] == 0.6
    columns = painted_columns(decoded(body["mask"]))
    assert columns[0] < WIDTH * 0.3 and columns[-1] > WIDTH * 0.7  # the stroke, with its round caps
    assert columns == list(range(columns[0], columns[-1] + 1))  # unbroken
    assert painted_rows(decoded(body["mask"])) < set(range(HEIGHT))  # the band, not the whole image
    job = job_of(server, submission)
    assert job["params"]["mask"] is True and job["params"]["strength"] == 0.6
    assert job["params"]["reference_sizes"] == [[WIDTH, HEIGHT], [WIDTH, HEIGHT]]

    card = results(page)
    assert loaded_size(page, "#gallery figure[data-seed] > img") == [True, WIDTH, HEIGHT]
    expect(card.locator(".details")).to_contain_text("masked, strength 0.60")
    expect(card.get_by_role("img", name="Mask")).to_have_attribute("src", body["mask"])

    # A result used as a reference joins at the end: the image edited, and its mask, stay.
    card.get_by_role("button", name="Use as reference").click()
    expect(page.locator("#refs li")).to_have_count(3)
    expect(strength).to_be_visible()
    # A new first reference drops the mask painted over the old one.
    page.get_by_role("button", name="Remove reference scene.png").click()
    expect(page.locator("#mask-image")).to_have_attribute("alt", "Reference other.png")
    expect(strength).to_be_hidden()
    expect(page.locator("#size")).to_be_enabled()


def test_eraser_and_clear(page: Page, server: RunningServer, tmp_path: Path) -> None:
    scene = reference_file(tmp_path)
    open_painter(page, server, scene)
    stroke(page, 0.2, 0.8)
    eraser = page.get_by_role("button", name="Eraser")
    eraser.click()
    expect(eraser).to_have_attribute("aria-pressed", "true")
    stroke(page, 0.4, 0.6, brush=60)  # erases the middle of the band

    # The mask saved for the copy-as code is OpenAI's form of the same pixels: transparent = repaint.
    with page.expect_download() as download:
        page.get_by_role("link", name="Download mask").click()
    assert download.value.suggested_filename == "scene-mask.png"
    openai_mask = Image.open(download.value.path())
    alpha = openai_mask.getchannel("A")
    columns = [x for x in range(WIDTH) if alpha.getpixel((x, MID)) == 0]
    assert columns and all(x < WIDTH * 0.45 or x > WIDTH * 0.55 for x in columns)  # two pieces left
    assert any(x < WIDTH * 0.4 for x in columns) and any(x > WIDTH * 0.6 for x in columns)

    # Erasing everything leaves no mask: nothing about one is sent, the reference goes as before.
    stroke(page, 0.0, 1.0, brush=96)
    expect(page.get_by_label("Strength")).to_be_hidden()
    expect(page.get_by_role("link", name="Download mask")).to_be_hidden()
    with submitted(page) as submissions:
        generate(page, size="auto")
        expect(results(page)).to_have_count(1)
    body = submissions[0].post_data_json
    assert "mask" not in body and "image_prompt" not in body and body["input_image"] == data_url(scene)
    expect(results(page).get_by_role("img", name="Mask")).to_have_count(0)

    # Clear empties the canvas in one click.
    eraser.click()
    expect(eraser).to_have_attribute("aria-pressed", "false")
    stroke(page, 0.1, 0.9)
    expect(page.get_by_label("Strength")).to_be_visible()
    page.get_by_role("button", name="Clear mask").click()
    expect(page.get_by_label("Strength")).to_be_hidden()
    assert page.locator("#mask-canvas").evaluate(
        "canvas => canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data"
        ".every((value) => value === 0)"
    )
    # Painted again, then the mode switched off: nothing is sent, and the paint is kept for when it is on.
    stroke(page, 0.1, 0.9)
    page.get_by_role("button", name="Paint mask").click()
    expect(page.locator("#mask-editor")).to_be_hidden()
    expect(page.locator("#size")).to_be_enabled()
    page.get_by_role("button", name="Paint mask").click()
    expect(page.get_by_label("Strength")).to_be_visible()
    expect(page.locator("#size")).to_be_disabled()


def test_copy_as_code_sends_the_mask(page: Page, server: RunningServer, tmp_path: Path) -> None:
    """Each client's snippet, run next to the downloaded mask, makes the image the playground made."""
    scene = reference_file(tmp_path)
    open_painter(page, server, scene)
    python = show_snippet(page, "python")
    assert "mask=" not in python  # nothing painted: the snippets are as without the painter
    page.fill("#seed", "7")
    stroke(page, 0.25, 0.75)
    page.get_by_label("Strength").fill("0.5")
    with submitted(page) as submissions:
        page.fill("#prompt", PROMPT)
        page.click("#generate")
        expect(results(page)).to_have_count(1)
    made = pixels(httpx.get(job_of(server, submissions[0])["result"]["images"][0]["url"]).content)

    curl = show_snippet(page, "curl")
    assert "-F 'image[]=@scene.png' \\\n  -F 'mask=@scene-mask.png'" in curl
    assert "--form-string 'seed=7' \\\n  --form-string 'strength=0.5'" in curl
    javascript = show_snippet(page, "js")
    assert 'images: [readFileSync("scene.png")], mask: readFileSync("scene-mask.png") },' in javascript
    assert "providerOptions: { kleinserve: { seed: 7, strength: 0.5 } }," in javascript
    python = show_snippet(page, "python")
    assert 'image=open("scene.png", "rb"),\n    mask=open("scene-mask.png", "rb"),' in python
    assert 'extra_body={"seed": 7, "strength": 0.5},' in python and "size=" not in python

    with page.expect_download() as download:
        page.get_by_role("link", name="Download mask").click()
    download.value.save_as(tmp_path / "scene-mask.png")
    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, check=True, timeout=120)
    assert pixels((tmp_path / "kleinserve-0.png").read_bytes()) == made
    run_node(javascript.replace('readFileSync("', f'readFileSync("{tmp_path}/'), tmp_path / "js")
    assert pixels((tmp_path / "js" / "kleinserve-0.png").read_bytes()) == made
    if shutil.which("curl"):
        answer = subprocess.run(
            ["bash", "-c", curl], cwd=tmp_path, capture_output=True, check=True, timeout=120
        )
        assert pixels(base64.b64decode(json.loads(answer.stdout)["data"][0]["b64_json"])) == made
