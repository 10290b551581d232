"""The embedded toy model, through the normal loader and the real HTTP server: it draws what it is asked.

Semantic checks use the same deterministic analyser as `kleinserve toy eval` (kleinserve/toy/evaluate.py).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from kleinserve.api.server import ServerSettings
from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.engine.loading import TOY_DIR, TOY_NAME
from kleinserve.toy.evaluate import analyse
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
    assert (toy.spec.default_side, toy.spec.max_sequence_length) == (256, 64)
    weights = sum(path.stat().st_size for path in TOY_DIR.rglob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024


def test_engine_matches_diffusers_on_the_toy_weights(toy: Pipeline) -> None:
    prompt = "a green star at the top-left on a black background"
    ours = toy.generate(GenerateRequest(prompt=prompt, width=128, height=128, seed=3)).images[0].image
    reference = Flux2KleinPipeline.from_pretrained(TOY_DIR)
    theirs = reference(
        prompt=prompt,
        height=128,
        width=128,
        num_inference_steps=4,
        max_sequence_length=toy.spec.max_sequence_length,  # 64: the toy's own (klein: 512)
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    difference = torch.tensor(list(ours.tobytes())) - torch.tensor(list(theirs.tobytes()))
    assert difference.abs().max() <= 1


# What the committed toy model has learned so far (README, "The embedded toy model"): the background named
# in the prompt (here at 256 px, OpenAI's smallest size; `kleinserve toy eval` covers 128 too). Shapes and
# edits are not learned yet (issue 5 stays open); their tests join this file with a model that passes eval.
@pytest.mark.parametrize(
    ("prompt", "side", "background"),
    [
        ("a red circle on a white background", 256, "white"),
        ("a blue square in the top left corner, black background", 256, "black"),
        ("a green star at the bottom right on a yellow background", 256, "yellow"),
        ("an orange triangle at the top on a cyan background", 256, "cyan"),
    ],
)
def test_the_background_follows_the_prompt_over_http(
    toy_server: RunningServer, prompt: str, side: int, background: str
) -> None:
    response = httpx.post(
        toy_server.base_url + "/v1/images/generations",
        json={"model": TOY_NAME, "prompt": prompt, "size": f"{side}x{side}", "seed": 1},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    image = _image(response.json())
    assert image.size == (side, side)
    assert analyse(image).background == background


def test_a_request_without_size_gets_the_toy_default(toy_server: RunningServer) -> None:
    response = httpx.post(
        toy_server.base_url + "/v1/images/generations",
        json={"model": TOY_NAME, "prompt": "a pink ring on a gray background", "seed": 4},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert _image(response.json()).size == (256, 256)
