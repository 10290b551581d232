"""The embedded toy model, through the normal loader and the real HTTP server: it draws what it is asked.

Semantic checks use the same deterministic analyser as `kleinserve toy eval` (kleinserve/toy/evaluate.py).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from kleinserve.api.server import ServerSettings
from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.engine.loading import TOY_DIR, TOY_NAME
from kleinserve.toy import scenes
from kleinserve.toy.config import TrainConfig
from kleinserve.toy.evaluate import analyse, check_inpaint, colour_shares, evaluate
from kleinserve.types import GenerateRequest
from tests.api.conftest import RunningServer, serve_in_thread


@pytest.fixture(scope="module")
def toy() -> Pipeline:
    return load_pipeline(TOY_NAME, dtype="float32")


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory, toy: Pipeline) -> Iterator[RunningServer]:
    running = serve_in_thread(ServerSettings(data_dir=tmp_path_factory.mktemp("toy-server")), toy)
    yield running
    running.stop()


def _image(body: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))


def test_toy_is_a_distilled_klein_under_its_own_name_and_small(toy: Pipeline) -> None:
    assert toy.spec.name == TOY_NAME
    assert toy.spec.distilled and toy.spec.default_steps == 4
    assert (toy.spec.default_side, toy.spec.max_sequence_length) == (256, 32)
    weights = sum(path.stat().st_size for path in TOY_DIR.rglob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024


def test_the_committed_weights_are_what_toy_train_makes_by_default() -> None:
    # `kleinserve toy train --out DIR` must reproduce the committed model: its defaults are the configuration
    # the weights were trained with (a default of 5,000 transformer steps once stood against 11,000 used).
    model_index = json.loads((TOY_DIR / "model_index.json").read_text())
    assert model_index["_kleinserve_training"] == dataclasses.asdict(TrainConfig())


def test_the_committed_weights_meet_the_issue_targets(toy: Pipeline) -> None:
    # What `kleinserve toy eval` prints (measured, 72 held-out captions a side: shape 88.9 % at 128 px and
    # 91.7 % at 256 px, one clean shape 95.8 / 98.6 %, colour and position 100 % at both, edit colour 100 %,
    # masked edits 100 % right colour inside and 100 % kept outside), on the same fp32 pipeline; a change to
    # the engine that draws the toy's scenes worse fails here. 72 a side, not 24: one image moves a side's
    # figure 1.4 points, not 4 (over the first 24 a side, shape at 256 px is 83.3 %).
    score = evaluate(toy)
    assert score.text_count == 144 and score.meets_targets(), score


def test_engine_matches_diffusers_on_the_toy_weights(toy: Pipeline) -> None:
    prompt = "a green star at the top-left on a black background"
    ours = toy.generate(GenerateRequest(prompt=prompt, width=128, height=128, seed=3)).images[0].image
    reference = Flux2KleinPipeline.from_pretrained(TOY_DIR)
    theirs = reference(
        prompt=prompt,
        height=128,
        width=128,
        num_inference_steps=4,
        max_sequence_length=toy.spec.max_sequence_length,  # 32: the toy's own (klein: 512)
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    difference = torch.tensor(list(ours.tobytes())) - torch.tensor(list(theirs.tobytes()))
    assert difference.abs().max() <= 1


def _mostly(image: Image.Image, colour: str) -> None:
    """`colour` explains at least half of the foreground (the rest: the haze of other colours the toy leaves
    around shapes)."""
    shares = colour_shares(image)
    assert shares[colour] >= 0.5, shares


# The issue's semantic checks, through the OpenAI endpoints as a client would call them; the analyser is
# `kleinserve toy eval`'s. Three seeds each: one lucky sample would prove nothing.
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_red_circle_on_a_white_background_over_http(toy_server: RunningServer, seed: int) -> None:
    response = httpx.post(
        toy_server.base_url + "/v1/images/generations",
        json={"model": TOY_NAME, "prompt": "a red circle on a white background", "seed": seed},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    image = _image(response.json())
    found = analyse(image)
    assert (found.background, found.colour, found.position) == ("white", "red", "centre"), found
    assert 0.02 < found.foreground < 0.2  # one shape of radius 0.14 covers ~6 % of the image
    _mostly(image, "red")


@pytest.mark.parametrize(
    ("shape", "before", "after", "position", "background", "seed"),
    [
        ("square", "blue", "red", "top-left", "gray", 1),
        ("circle", "yellow", "green", "right", "white", 2),
        ("triangle", "purple", "orange", "bottom", "black", 3),
    ],
)
def test_an_edit_keeps_the_shape_and_changes_its_colour_over_http(
    toy_server: RunningServer, shape: str, before: str, after: str, position: str, background: str, seed: int
) -> None:
    reference = scenes.render(scenes.Scene((scenes.Shape(shape, before, position),), background), 256)
    buffer = io.BytesIO()
    reference.save(buffer, format="PNG")
    response = httpx.post(
        toy_server.base_url + "/v1/images/edits",
        data={"model": TOY_NAME, "prompt": f"make the {shape} {after}", "seed": str(seed)},
        files={"image": ("reference.png", buffer.getvalue(), "image/png")},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    image = _image(response.json())
    assert image.size == (256, 256)  # the reference's size
    found = analyse(image)
    assert (found.background, found.colour, found.position) == (background, after, position), found
    _mostly(image, after)


@pytest.mark.parametrize(
    ("old", "new", "prompt", "background", "side", "seed"),
    [
        (("square", "red", "bottom-left"), ("circle", "blue", "top-right"), "a blue circle", "white", 256, 1),
        (("ring", "yellow", "centre"), ("star", "green", "left"), "draw a green star", "black", 128, 2),
        (("circle", "pink", "top"), ("square", "orange", "bottom"), "a orange square", "gray", 256, 3),
    ],
)
def test_a_masked_edit_paints_the_prompt_inside_and_keeps_the_scene_outside(
    toy: Pipeline,
    old: tuple[str, str, str],
    new: tuple[str, str, str],
    prompt: str,
    background: str,
    side: int,
    seed: int,
) -> None:
    before = scenes.Scene((scenes.Shape(*old),), background)
    after = scenes.Scene((*before.shapes, scenes.Shape(*new)), background)
    example = scenes.Example(prompt, after, (before,), "inpaint")
    request = GenerateRequest(
        prompt=prompt,
        seed=seed,
        reference_images=(scenes.render(before, side),),
        mask=scenes.inpaint_mask(example, side),
    )
    image = toy.generate(request).images[0].image
    assert image.size == (side, side)  # the edited image's size
    check = check_inpaint(example, image)
    assert check.colour and check.kept and check.difference < 4, check


def test_a_request_without_size_gets_the_toy_default(toy_server: RunningServer) -> None:
    response = httpx.post(
        toy_server.base_url + "/v1/images/generations",
        json={"model": TOY_NAME, "prompt": "a pink ring on a gray background", "seed": 4},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert _image(response.json()).size == (256, 256)
