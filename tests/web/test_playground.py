"""The playground at `/`, used as a person would, in headless Chromium against a live kleinserve.

Each test types, clicks and looks at what the page shows; the copy-as snippets are also run as they are
(Python with the openai SDK, Node with the locked AI SDK packages, curl) against the same server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect

from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore
from kleinserve.api.server import ServerSettings
from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.engine.tiny import create_tiny
from kleinserve.types import CancelCheck, Progress, StepCallback
from tests.api.conftest import RunningServer, serve_in_thread
from tests.conftest import random_image
from tests.jobs.gate import WAIT_S, Gate
from tests.web.conftest import open_page, snapshot

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
PROMPT = "a red fox in the snow"


def generate(page: Page, prompt: str = PROMPT, size: str = "512x512") -> None:
    page.fill("#prompt", prompt)
    page.select_option("#size", size)
    page.click("#generate")


def results(page: Page) -> object:
    """The gallery's finished cards (a finished card carries its seed)."""
    return page.locator("#gallery figure[data-seed]")


def loaded_size(page: Page, selector: str) -> list[object]:
    """[complete, naturalWidth, naturalHeight] of an <img>: what the browser actually decoded."""
    return page.locator(selector).evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")


def test_generate_shows_the_image_in_the_gallery(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    expect(page.locator("#model")).to_contain_text("tiny-random")
    expect(page.locator("#sampling")).to_be_hidden()  # distilled: steps and guidance are fixed

    generate(page, size="576x432")

    card = results(page)
    expect(card).to_have_count(1)
    assert loaded_size(page, "#gallery figure[data-seed] img") == [True, 576, 432]
    seed = page.input_value("#seed")  # a random seed, drawn by the page and shown
    expect(card.locator(".details")).to_have_text(f"seed {seed} · 576×432 · 4 steps · guidance 1.0")
    download = card.locator("a", has_text="Download")
    assert download.get_attribute("download") == f"kleinserve-{seed}.png"
    expect(page.locator("#progress-text")).to_have_text("Done")
    expect(page.locator("#progress-bar")).to_have_js_property("value", 1)
    expect(page.locator("#error")).to_be_hidden()


def test_several_images_follow_their_seeds(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    page.fill("#seed", "41")  # typing a seed locks it
    expect(page.locator("#seed-lock")).to_be_checked()
    page.select_option("#count", "3")
    generate(page, size="384x672")
    expect(results(page)).to_have_count(3)
    seeds = results(page).evaluate_all("cards => cards.map(card => card.dataset.seed)")
    assert seeds == ["41", "42", "43"]  # one job per image, seed + i, shown in seed order
    for index in range(3):
        assert loaded_size(page, f"#gallery figure >> nth={index} >> img") == [True, 384, 672]


def test_reference_image_thumbnail_then_result(page: Page, server: RunningServer, tmp_path: Path) -> None:
    reference = tmp_path / "cat.png"
    random_image(320, 240, seed=3).save(reference)
    page.goto(server.base_url + "/")

    page.set_input_files("#ref-input", str(reference))
    thumbnails = page.locator("#refs li img")
    expect(thumbnails).to_have_count(1)
    expect(thumbnails).to_have_attribute("alt", "cat.png")
    assert loaded_size(page, "#refs li img") == [True, 320, 240]

    generate(page, prompt="the same cat, in blue", size="auto")  # auto: the reference's size
    expect(results(page)).to_have_count(1)
    assert loaded_size(page, "#gallery figure[data-seed] img") == [True, 320, 240]
    expect(results(page).locator(".details")).to_contain_text("1 reference")

    # A result becomes a reference; each thumbnail can be removed.
    results(page).get_by_role("button", name="Use as reference").click()
    expect(thumbnails).to_have_count(2)
    page.get_by_role("button", name="Remove reference cat.png").click()
    expect(thumbnails).to_have_count(1)
    expect(thumbnails).to_have_attribute("alt", f"kleinserve-{page.input_value('#seed')}.png")


def test_references_by_drag_and_drop(page: Page, server: RunningServer) -> None:
    buffer = io.BytesIO()
    random_image(96, 64, seed=2).save(buffer, format="PNG")
    page.goto(server.base_url + "/")
    # What a browser hands the page when files are dropped on it: a DataTransfer holding File objects.
    dropped = page.evaluate_handle(
        """([png, text]) => {
            const transfer = new DataTransfer();
            const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            transfer.items.add(new File([text], "notes.txt", { type: "text/plain" }));
            return transfer;
        }""",
        [base64.b64encode(buffer.getvalue()).decode(), "not an image"],
    )
    page.dispatch_event("#drop", "dragover", {"dataTransfer": dropped})
    expect(page.locator("#drop")).to_have_class(re.compile(r"\bover\b"))
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    expect(page.locator("#refs li img")).to_have_attribute("alt", "dropped.png")
    expect(page.locator("#refs li")).to_have_count(1)
    expect(page.locator("#error")).to_have_text("Only images can be references; other files were left out.")
    expect(page.locator("#drop")).not_to_have_class(re.compile(r"\bover\b"))


def test_at_most_four_references(page: Page, server: RunningServer, tmp_path: Path) -> None:
    files = []
    for index in range(5):
        files.append(tmp_path / f"ref-{index}.png")
        random_image(64, 64, seed=index).save(files[-1])
    page.goto(server.base_url + "/")
    page.set_input_files("#ref-input", [str(path) for path in files])
    expect(page.locator("#refs li")).to_have_count(4)
    expect(page.locator("#error")).to_have_text("At most 4 reference images: 1 left out.")


def test_too_large_size_shows_the_server_error_then_works(page: Page, server: RunningServer) -> None:
    page.goto(server.base_url + "/")
    page.select_option("#size", "custom")
    page.fill("#width", "4096")
    page.fill("#height", "4096")
    page.fill("#prompt", PROMPT)
    page.click("#generate")

    error = page.locator("#error")
    expect(error).to_be_visible()
    # The BFL endpoint's own message (422 {"detail": [{"msg": ...}]}), in a plain sentence.
    expect(error).to_have_text(
        "The server refused these settings: width: Input should be less than or equal to 2048."
    )
    expect(page.locator("#gallery figure")).to_have_count(0)
    expect(page.locator("#generate")).to_be_enabled()
    snapshot(page, "too-large-size-error")

    page.fill("#width", "512")
    page.fill("#height", "256")
    page.click("#generate")
    expect(results(page)).to_have_count(1)
    expect(error).to_be_hidden()
    assert loaded_size(page, "#gallery figure[data-seed] img") == [True, 512, 256]


def show_snippet(page: Page, kind: str) -> str:
    page.click(f"[data-snippet={kind}]")
    expect(page.locator("#code")).to_be_visible()
    return page.locator("#code").inner_text()


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def test_copy_as_code_makes_the_same_call(page: Page, server: RunningServer, tmp_path: Path) -> None:
    """The snippets carry the current prompt, size, count and seed, and run as they are."""
    prompt = 'a fox\'s "den" at dawn'  # quotes of both kinds, for every language's quoting
    page.goto(server.base_url + "/")
    page.fill("#prompt", prompt)
    page.select_option("#size", "576x432")
    page.select_option("#count", "2")
    page.fill("#seed", "7")

    curl = show_snippet(page, "curl")
    assert curl.startswith(f"curl -sS {server.base_url}/v1/images/generations")
    body = {"model": "flux-2-klein-4b", "prompt": prompt, "size": "576x432", "n": 2, "seed": 7}
    assert json.dumps(body, separators=(",", ":")).replace("'", "'\\''") in curl

    python = show_snippet(page, "python")
    assert f"prompt={json.dumps(prompt)}," in python
    assert 'size="576x432",' in python and "n=2," in python and 'extra_body={"seed": 7},' in python
    assert f'base_url="{server.base_url}/v1"' in python

    javascript = show_snippet(page, "js")
    assert f"prompt: {json.dumps(prompt)}," in javascript
    assert 'size: "576x432",' in javascript and "n: 2," in javascript
    assert "providerOptions: { kleinserve: { seed: 7 } }," in javascript

    # Changing a setting updates the code shown.
    page.select_option("#size", "432x576")
    expect(page.locator("#code")).to_contain_text('size: "432x576"')
    page.select_option("#size", "576x432")

    # Each snippet, run as it is, makes two 576x432 images.
    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, check=True, timeout=120)
    made = [(tmp_path / f"kleinserve-{index}.png").read_bytes() for index in range(2)]
    assert [png_size(data) for data in made] == [(576, 432)] * 2

    node = shutil.which("node")
    assert node, "Node.js is needed for the AI SDK snippet: install it, then `make node-setup`"
    js_dir = tmp_path / "js"
    js_dir.mkdir()
    # --input-type=module reads the module from stdin and resolves its imports from the working directory.
    script = javascript.replace("kleinserve-${index}.png", f"{js_dir}/kleinserve-${{index}}.png")
    subprocess.run(
        [node, "--input-type=module"], input=script, text=True, cwd=NODE_DIR, check=True, timeout=120
    )
    assert [(js_dir / f"kleinserve-{i}.png").read_bytes() for i in range(2)] == made  # same seeds

    if shutil.which("curl"):
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, check=True, timeout=120)
        data = [base64.b64decode(item["b64_json"]) for item in json.loads(answer.stdout)["data"]]
        assert data == made


def test_copy_as_code_with_references(page: Page, server: RunningServer, tmp_path: Path) -> None:
    reference = tmp_path / "photo @1.png"  # a name that needs quoting, starting no field with @
    random_image(256, 256, seed=5).save(reference)
    page.goto(server.base_url + "/")
    page.fill("#prompt", "@make it blue")
    page.set_input_files("#ref-input", str(reference))
    page.select_option("#size", "auto")

    curl = show_snippet(page, "curl")
    assert f"{server.base_url}/v1/images/edits" in curl
    assert "--form-string 'prompt=@make it blue'" in curl and "-F 'image[]=@photo @1.png'" in curl
    python = show_snippet(page, "python")
    assert "client.images.edit(" in python and 'image=open("photo @1.png", "rb"),' in python
    assert "size=" not in python  # auto
    javascript = show_snippet(page, "js")
    assert 'prompt: { text: "@make it blue", images: [readFileSync("photo @1.png")] },' in javascript

    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, check=True, timeout=120)
    assert png_size((tmp_path / "kleinserve-0.png").read_bytes()) == (256, 256)
    if shutil.which("curl"):
        answer = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, check=True)
        assert len(json.loads(answer.stdout)["data"]) == 1


@pytest.fixture
def phone(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """An iPhone-sized screen that honours the viewport meta tag, as a phone's browser does."""
    yield from open_page(
        browser,
        request,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )


def test_phone_screen_has_no_horizontal_scroll(phone: Page, server: RunningServer, tmp_path: Path) -> None:
    reference = tmp_path / "a-reference-image-with-a-rather-long-file-name.png"
    random_image(300, 200, seed=1).save(reference)
    phone.goto(server.base_url + "/")
    phone.set_input_files("#ref-input", str(reference))
    generate(phone, prompt=PROMPT + " " + "and a very long prompt " * 20, size="672x384")
    expect(results(phone)).to_have_count(1)
    show_snippet(phone, "python")  # long code lines scroll inside their box, not the page

    widths = phone.evaluate(
        "() => [document.documentElement.clientWidth, document.documentElement.scrollWidth,"
        " document.body.scrollWidth]"
    )
    assert widths == [390, 390, 390]
    image = results(phone).locator("img")
    assert image.bounding_box()["width"] <= 390  # type: ignore[index]


def test_api_key_is_kept_and_sent(
    page: Page, start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """With keys, the page itself loads without one, says plainly that a key is needed, and works once one
    is typed; the key is kept in localStorage across reloads."""
    keys = SqliteKeyStore(tmp_path / "data-0" / DATABASE_NAME)
    key = keys.create("alice")
    keys.close()
    running = start_server()
    assert httpx.get(running.base_url + "/").status_code == 200

    page.goto(running.base_url + "/")
    expect(page.locator("#error")).to_have_text("This server needs an API key: enter it at the top.")
    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    expect(page.locator("#error")).to_have_text(
        "The server did not accept the API key: invalid API key. Check the key at the top of the page."
    )
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    expect(page.locator("#model")).to_contain_text("tiny-random")
    expect(page.locator("#error")).to_be_hidden()

    page.reload()
    expect(page.locator("#api-key")).to_have_value(key)
    generate(page)
    expect(results(page)).to_have_count(1)
    python = show_snippet(page, "python")
    assert 'api_key=os.environ["KLEINSERVE_API_KEY"],' in python and key not in python
    env = {**os.environ, "KLEINSERVE_API_KEY": key}
    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, check=True, timeout=120)


@pytest.fixture(scope="module")
def base_server(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> Iterator[RunningServer]:
    """A server with an undistilled (CFG) tiny model: steps and guidance can be set."""
    pipeline: Pipeline = load_pipeline(str(tiny_base_dir), dtype="float32")
    running = serve_in_thread(ServerSettings(data_dir=tmp_path_factory.mktemp("base-data")), pipeline)
    yield running
    running.stop()


def test_base_variant_offers_steps_and_guidance(page: Page, base_server: RunningServer) -> None:
    page.goto(base_server.base_url + "/")
    expect(page.locator("#sampling")).to_be_visible()
    expect(page.locator("#steps")).to_have_value("50")  # the variant's defaults, from its schema
    expect(page.locator("#guidance")).to_have_value("4")
    page.fill("#steps", "2")
    page.fill("#guidance", "2.5")
    generate(page)
    expect(results(page)).to_have_count(1)
    seed = page.input_value("#seed")
    expect(results(page).locator(".details")).to_have_text(f"seed {seed} · 512×512 · 2 steps · guidance 2.5")
    python = show_snippet(page, "python")
    assert 'extra_body={"num_inference_steps": 2, "guidance_scale": 2.5},' in python


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server whose model defaults to 256x256 (as the toy model does): the tiny model, so marked."""
    directory = create_tiny(tmp_path_factory.mktemp("models") / "tiny-256")
    index_path = directory / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "_kleinserve_default_side": 256}))
    pipeline = load_pipeline(str(directory), dtype="float32")
    assert pipeline.spec.default_side == 256
    running = serve_in_thread(ServerSettings(data_dir=tmp_path_factory.mktemp("small-data")), pipeline)
    yield running
    running.stop()


def test_size_starts_at_the_models_default(
    page: Page, server: RunningServer, small_server: RunningServer
) -> None:
    page.goto(server.base_url + "/")
    expect(page.locator("#model")).to_contain_text("tiny-random")
    expect(page.locator("#size")).to_have_value("1024x1024")

    page.goto(small_server.base_url + "/")
    expect(page.locator("#size")).to_have_value("256x256")  # from the schema's size.default
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    expect(results(page)).to_have_count(1)
    assert loaded_size(page, "#gallery figure[data-seed] img") == [True, 256, 256]
    expect(results(page).locator(".details")).to_contain_text("256×256")


def test_size_picked_before_the_schema_arrives_is_kept(page: Page, small_server: RunningServer) -> None:
    def pick_then_answer(route: Route) -> None:
        page.select_option("#size", "128x128")  # the user is quicker than the model's schema
        route.continue_()

    page.route("**/v1/models/*", pick_then_answer)
    page.goto(small_server.base_url + "/")
    expect(page.locator("#model")).to_contain_text("tiny-random")  # the schema has been read
    expect(page.locator("#size")).to_have_value("128x128")


HELD_PROMPT = "a slow fox"


@dataclass
class HeldEngine:
    """Gates on the engine thread for jobs with HELD_PROMPT: `before_first` holds it before step 1 is
    reported, `after_second` once step 2 (and its preview) has been published."""

    before_first: Gate = field(default_factory=Gate)
    after_second: Gate = field(default_factory=Gate)


@pytest.fixture
def held(tmp_path: Path, tiny_dir: Path) -> Iterator[tuple[RunningServer, HeldEngine]]:
    """A server of its own whose engine the test can hold still between steps (no sleeps, no races)."""
    pipeline = load_pipeline(str(tiny_dir), dtype="float32")
    gates = HeldEngine()
    run_batch = pipeline.generate_batch

    def generate_batch(
        requests: list[Any], on_step: StepCallback | None = None, cancelled: CancelCheck | None = None
    ) -> Any:
        if on_step is None or getattr(requests[0], "request", requests[0]).prompt != HELD_PROMPT:
            return run_batch(requests, on_step, cancelled)

        def step(progress: Progress) -> None:
            if progress.step == 1:
                gates.before_first(progress)
            on_step(progress)
            if progress.step == 2:
                gates.after_second(progress)

        return run_batch(requests, step, cancelled)

    pipeline.generate_batch = generate_batch  # type: ignore[method-assign]
    running = serve_in_thread(ServerSettings(data_dir=tmp_path / "held-data"), pipeline)
    yield running, gates
    gates.before_first.release()
    gates.after_second.release()
    running.stop()


def test_progress_bar_step_previews_and_cancel(page: Page, held: tuple[RunningServer, HeldEngine]) -> None:
    running, gates = held
    page.goto(running.base_url + "/")
    generate(page, prompt=HELD_PROMPT)
    assert gates.before_first.reached.wait(WAIT_S)
    expect(page.locator("#progress-text")).to_have_text("Running…")  # following the job's events
    expect(page.locator("#cancel")).to_be_visible()
    gates.before_first.release()

    assert gates.after_second.reached.wait(WAIT_S)
    card = page.locator("#gallery figure")
    preview = card.locator(".pending img")
    expect(preview).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    expect(page.locator("#progress-text")).to_have_text("Step 2 of 4")
    expect(page.locator("#progress-bar")).to_have_js_property("value", 0.5)
    assert loaded_size(page, "#gallery figure .pending img")[0] is True
    snapshot(page, "step-preview")

    page.click("#cancel")
    expect(page.locator("#cancel")).to_be_visible()
    gates.after_second.release()  # the cancel takes effect at the next step
    expect(card.locator("figcaption")).to_have_text("Cancelled.")
    expect(page.locator("#progress-text")).to_have_text("0 of 1 made")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_hidden()
