"""The playground's LoRA adapter picker (issue 17), in headless Chromium against a server with `--lora-dir`:
absent without adapters, the image it makes equals the API's for the same `loras`, the copy-as code carries
the adapters in each client's way and runs, and at most 4 adapters can be added.

The server is tests/api/test_loras.py's `lora_server` (re-exported by tests/web/conftest.py) over the
adapters of `lora_dir` below: every block projection, so that a scale of 0.5 visibly changes the image.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from kleinserve.engine import Pipeline
from kleinserve.engine.lora_layers import linear_shapes
from kleinserve.engine.tiny_lora import lora_projections, random_lora, write_lora
from tests.api.conftest import RunningServer
from tests.api.test_bfl import poll
from tests.api.test_loras import recorded_loras
from tests.conftest import random_image
from tests.web.conftest import DESKTOP
from tests.web.test_playground import NODE_DIR, PROMPT, generate, results, show_snippet

SEED = 5
SIZE = 256  # the OpenAI endpoints' smallest side: the cheapest image every client can ask for
CHOSEN = [{"name": "moss", "scale": 0.5}]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, server_pipeline: Pipeline) -> Path:
    """Adapters "fern", "ink", "moss" and "rust" of every block projection of the tiny model, in diffusers'
    format."""
    folder = tmp_path_factory.mktemp("web-loras")
    shapes = linear_shapes(server_pipeline.components.transformer)
    blocks = lora_projections(shapes)
    for seed, name in enumerate(("ink", "moss", "fern", "rust")):
        factors = random_lora(shapes, blocks, rank=4, seed=seed, strength=2.0)
        write_lora(folder / f"{name}.safetensors", factors, blocks, "diffusers")
    return folder


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (SIZE, SIZE)
        return image.convert("RGB").tobytes()


def api_image(server: RunningServer, loras: list[dict[str, Any]] | None) -> bytes:
    """The pixels the BFL endpoint (the playground's) makes for PROMPT, SEED and SIZE with `loras` sent
    directly (None: no `loras` key)."""
    body: dict[str, Any] = {"prompt": PROMPT, "seed": SEED, "width": SIZE, "height": SIZE}
    body |= {"output_format": "png"} | ({} if loras is None else {"loras": loras})
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        answer = http.post("/v1/flux-2-klein-4b", json=body)
        assert answer.status_code == 200, answer.text
        ready = poll(http, answer.json()["polling_url"])
        assert ready["status"] == "Ready", ready
        return pixels(http.get(ready["result"]["sample"]).content)


def run_node(javascript: str, folder: Path) -> None:
    """Run an AI SDK snippet (its imports resolve from NODE_DIR), writing its images into `folder`."""
    folder.mkdir()
    node = shutil.which("node")
    assert node, "Node.js is needed for the AI SDK snippet: install it, then `make node-setup`"
    script = javascript.replace("kleinserve-${index}.png", f"{folder}/kleinserve-${{index}}.png")
    subprocess.run(
        [node, "--input-type=module"], input=script, text=True, cwd=NODE_DIR, check=True, timeout=120
    )


def choose(page: Page, number: int, name: str, scale: str) -> None:
    page.get_by_label(f"Adapter {number}", exact=True).select_option(name)
    page.get_by_role("slider", name=f"Scale of adapter {number}").fill(scale)


def open_with_settings(page: Page, server: RunningServer) -> None:
    """The page at `server` with PROMPT, a locked SEED and SIZE x SIZE, once the adapters are listed."""
    page.goto(server.base_url + "/")
    expect(page.get_by_role("button", name="Add adapter")).to_be_visible()
    page.fill("#prompt", PROMPT)
    page.fill("#seed", str(SEED))
    page.select_option("#size", f"{SIZE}x{SIZE}")


def test_no_adapter_control_without_adapters(page: Page, server: RunningServer) -> None:
    with page.expect_response("**/v1/loras") as listed:
        page.goto(server.base_url + "/")
    assert listed.value.json() == {"object": "list", "data": []}
    expect(page.locator("#model")).to_contain_text("tiny-random")
    expect(page.get_by_role("group", name="LoRA adapters (up to 4)")).to_be_hidden()
    expect(page.get_by_role("button", name="Add adapter")).to_be_hidden()

    with page.expect_request(lambda request: request.method == "POST") as submitted:
        generate(page, size=f"{SIZE}x{SIZE}")
    assert "loras" not in submitted.value.post_data_json  # the wire as before adapters
    assert "loras" not in show_snippet(page, "curl")
    expect(results(page)).to_have_count(1)


def test_adapter_changes_the_image_as_the_api_does(page: Page, lora_server: RunningServer) -> None:
    open_with_settings(page, lora_server)
    page.get_by_role("button", name="Add adapter").click()
    choose(page, 1, "moss", "0.5")
    expect(page.locator("#lora-list output")).to_have_text("0.50")

    with page.expect_request(lambda request: request.method == "POST") as submitted:
        page.click("#generate")
    assert submitted.value.post_data_json["loras"] == CHOSEN
    card = results(page)
    expect(card).to_have_count(1)
    expect(card.locator(".details")).to_contain_text("LoRA moss ×0.5")
    with page.expect_download() as download:
        card.get_by_role("link", name="Download").click()
    shown = pixels(download.value.path().read_bytes())

    assert shown == api_image(lora_server, CHOSEN)
    assert shown != api_image(lora_server, None)


def test_copy_as_code_carries_the_adapters(page: Page, lora_server: RunningServer, tmp_path: Path) -> None:
    open_with_settings(page, lora_server)
    page.get_by_role("button", name="Add adapter").click()
    choose(page, 1, "moss", "0.5")
    wire = json.dumps(CHOSEN, separators=(",", ":"))

    curl = show_snippet(page, "curl")
    assert f',"seed":{SEED},"loras":{wire}}}' in curl
    python = show_snippet(page, "python")
    assert f'extra_body={{"seed": {SEED}, "loras": {wire}}},' in python
    javascript = show_snippet(page, "js")
    assert f"providerOptions: {{ kleinserve: {{ seed: {SEED}, loras: {wire} }} }}," in javascript

    # Run as they are, each makes the image that the same `loras` sent directly makes.
    expected = api_image(lora_server, CHOSEN)
    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, check=True, timeout=120)
    assert pixels((tmp_path / "kleinserve-0.png").read_bytes()) == expected
    run_node(javascript, tmp_path / "js")
    assert pixels((tmp_path / "js" / "kleinserve-0.png").read_bytes()) == expected

    # With a reference, the edits endpoint is multipart: `loras` is its array's JSON text.
    reference = tmp_path / "ref.png"
    random_image(SIZE, SIZE, seed=4).save(reference)
    page.set_input_files("#ref-input", str(reference))
    expect(page.locator("#refs li")).to_have_count(1)
    curl = show_snippet(page, "curl")
    assert f"--form-string 'loras={wire}'" in curl
    python = show_snippet(page, "python")
    assert "import json\n" in python and f'"loras": json.dumps({wire})' in python
    javascript = show_snippet(page, "js")
    assert f"loras: JSON.stringify({wire})" in javascript
    for command in ([sys.executable, "-c", python], ["bash", "-c", curl]):
        subprocess.run(command, cwd=tmp_path, capture_output=True, check=True, timeout=120)
        assert recorded_loras(lora_server) == CHOSEN
    run_node(javascript.replace('"ref.png"', json.dumps(str(reference))), tmp_path / "js-edit")
    assert recorded_loras(lora_server) == CHOSEN


def test_at_most_four_adapters(page: Page, lora_server: RunningServer) -> None:
    page.goto(lora_server.base_url + "/")
    add = page.get_by_role("button", name="Add adapter")
    for _ in range(4):
        add.click()
    expect(add).to_be_disabled()  # the server's MAX_LORAS
    rows = page.locator("#lora-list li")
    expect(rows).to_have_count(4)
    # Each add picks an adapter not chosen yet (a request names each once); every scale starts at 1.
    names = [page.get_by_label(f"Adapter {number}", exact=True).input_value() for number in range(1, 5)]
    assert names == ["fern", "ink", "moss", "rust"]
    expect(rows.locator("output")).to_have_text(["1.00"] * 4)
    page.set_viewport_size({"width": 390, "height": 844})  # four rows fit a phone's width
    assert page.evaluate("() => document.documentElement.scrollWidth") == 390
    page.set_viewport_size(DESKTOP)

    page.get_by_role("button", name="Remove adapter 1").click()
    expect(rows).to_have_count(3)
    expect(page.get_by_label("Adapter 1", exact=True)).to_have_value("ink")  # the rest move up
    expect(add).to_be_enabled()
