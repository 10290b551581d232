"""The OpenAI Images surface as the official `openai` Python SDK sees it, against the real loopback server.

Pixels are compared with this module's own engine (same tiny weights, fp32): the server must return exactly
what the engine makes for the same prompt, size, seed and references.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image

from kleinserve.api.openai import _send_previews
from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.types import GenerateRequest, Progress
from tests.api.conftest import RunningServer
from tests.conftest import max_difference, random_image

MODEL = "flux-2-klein-4b"
PROMPT = "a lighthouse on a cliff at dusk"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FileTuple = tuple[str, bytes, str]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Pipeline:
    """Our own pipeline on the test thread (the server's belongs to its engine thread)."""
    return load_pipeline(str(tiny_dir), dtype="float32")


@pytest.fixture(scope="module")
def reference() -> Image.Image:
    """An odd-sized reference: processed to 96x64 (centre-cropped to multiples of 16), 24 latent tokens."""
    return random_image(100, 70, seed=11)


@pytest.fixture(scope="module")
def others() -> tuple[Image.Image, Image.Image]:
    """Two more references, 512 latent tokens each: large enough to visibly sway the tiny model."""
    return random_image(512, 256, seed=12), random_image(256, 512, seed=13)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(image: Image.Image, name: str = "reference.png") -> FileTuple:
    return (name, png_bytes(image), "image/png")


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def decode_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_b64(text: str | None) -> Image.Image:
    assert text is not None
    return decode_png(base64.b64decode(text, validate=True))


def alone(
    engine: Pipeline,
    seed: int,
    width: int | None = 256,
    height: int | None = 256,
    references: tuple[Image.Image, ...] = (),
    prompt: str = PROMPT,
) -> Image.Image:
    """The engine's image for one seed, generated on its own."""
    request = GenerateRequest(prompt, width=width, height=height, seed=seed, reference_images=references)
    return engine.generate(request).images[0].image


def prompt_tokens(engine: Pipeline, prompt: str) -> int:
    """Tokens of `prompt` in the chat template, as the tokenizer itself counts them (no padding, no cap)."""
    message = [{"role": "user", "content": prompt}]
    templated = engine.components.tokenizer.apply_chat_template(
        message, tokenize=True, add_generation_prompt=True, enable_thinking=False
    )
    return len(templated["input_ids"])


def seeds(response: ImagesResponse) -> list[int]:
    assert response.data is not None
    return [item.to_dict()["seed"] for item in response.data]


def images_of(response: ImagesResponse) -> list[Image.Image]:
    assert response.data is not None
    return [decode_b64(item.b64_json) for item in response.data]


def bad_request(call: Callable[[], object]) -> tuple[dict[str, Any], str]:
    """The SDK's error dict and the raw wire body's `error` object of a call that must answer 400."""
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    wire = caught.value.response.json()["error"]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body == wire  # the SDK hands over the `error` object itself
    assert wire["type"] == "invalid_request_error"
    return wire, caught.value.message


# 1 -------------------------------------------------------------------------------------------------------


def test_generate_two_b64_pngs_with_consecutive_seeds(client: openai.OpenAI, engine: Pipeline) -> None:
    response = client.images.generate(model=MODEL, prompt=PROMPT, n=2, size="256x256", extra_body={"seed": 7})

    images = images_of(response)
    assert [image.size for image in images] == [(256, 256), (256, 256)]
    assert [image.format for image in images] == ["PNG", "PNG"]
    assert seeds(response) == [7, 8]
    assert response.model_extra is not None and response.model_extra["model"] == MODEL
    assert response.size == "256x256"
    assert response.output_format == "png"
    assert response.usage is not None
    assert response.usage.output_tokens == 2 * (256 // 16) ** 2
    text_tokens = prompt_tokens(engine, PROMPT)
    assert response.usage.input_tokens == response.usage.input_tokens_details.text_tokens == text_tokens
    assert response.usage.input_tokens_details.image_tokens == 0
    assert response.usage.total_tokens == text_tokens + 2 * (256 // 16) ** 2
    # image 1 is what seed 8 gives alone, and differs from image 0
    assert max_difference(images[1], alone(engine, seed=8)) <= 1
    assert max_difference(images[0], alone(engine, seed=7)) <= 1
    assert max_difference(images[0], images[1]) > 1


# 2 -------------------------------------------------------------------------------------------------------


def test_url_response_serves_the_same_pixels_behind_a_signed_link(
    client: openai.OpenAI, server: RunningServer
) -> None:
    common: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "size": "256x256", "n": 2}
    linked = client.images.generate(**common, response_format="url", extra_body={"seed": 21})
    inline = client.images.generate(**common, response_format="b64_json", extra_body={"seed": 21})

    assert linked.data is not None and seeds(linked) == [21, 22]
    for item, expected in zip(linked.data, images_of(inline), strict=True):
        assert item.b64_json is None
        assert item.url is not None and item.url.startswith(server.base_url + "/media/")
        fetched = httpx.get(item.url)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/png"
        assert max_difference(decode_png(fetched.content), expected) == 0

    url = linked.data[0].url
    assert url is not None
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}"

    flipped = query["signature"][:-1] + ("0" if query["signature"][-1] != "0" else "1")
    tampered = httpx.get(f"{base}{parts.path}?{urlencode({**query, 'signature': flipped})}")
    assert tampered.status_code == 403
    assert "signature" in tampered.json()["error"]["message"]
    later = httpx.get(f"{base}{parts.path}?{urlencode({**query, 'expires': int(query['expires']) + 60})}")
    assert later.status_code == 403  # the expiry is signed too
    other_name = httpx.get(f"{base}/media/not-an-image.png?{parts.query}")
    assert other_name.status_code in (403, 404)


# 3 -------------------------------------------------------------------------------------------------------


def test_size_not_a_multiple_of_16_is_rounded_down(client: openai.OpenAI, engine: Pipeline) -> None:
    response = client.images.generate(model=MODEL, prompt=PROMPT, size="300x260", extra_body={"seed": 5})

    assert response.size == "288x256"
    [image] = images_of(response)
    assert image.size == (288, 256)
    assert response.usage is not None and response.usage.output_tokens == (288 // 16) * (256 // 16)
    assert max_difference(image, alone(engine, seed=5, width=288, height=256)) <= 1


# 4 -------------------------------------------------------------------------------------------------------


def test_edit_with_one_and_with_three_references(
    client: openai.OpenAI, engine: Pipeline, reference: Image.Image, others: tuple[Image.Image, Image.Image]
) -> None:
    one = client.images.edit(
        model=MODEL, image=upload(reference), prompt=PROMPT, size="256x256", extra_body={"seed": 3}
    )
    three = client.images.edit(
        model=MODEL,
        image=[upload(reference, "a.png"), upload(others[0], "b.png"), upload(others[1], "c.png")],
        prompt=PROMPT,
        size="256x256",
        extra_body={"seed": 3},
    )

    [single] = images_of(one)
    [multi] = images_of(three)
    assert single.size == multi.size == (256, 256)
    assert one.size == three.size == "256x256"
    assert seeds(one) == seeds(three) == [3]
    # every reference counted: 96x64 is 24 latent tokens, 512x256 and 256x512 are 512 each
    assert one.usage is not None and one.usage.input_tokens_details.image_tokens == 24
    assert three.usage is not None and three.usage.input_tokens_details.image_tokens == 24 + 512 + 512
    assert max_difference(single, multi) > 1
    assert max_difference(single, alone(engine, seed=3, references=(reference,))) <= 1
    assert max_difference(multi, alone(engine, seed=3, references=(reference, *others))) <= 1


def test_edit_without_size_takes_the_first_reference_size(
    client: openai.OpenAI, reference: Image.Image
) -> None:
    response = client.images.edit(
        model=MODEL,
        image=[upload(reference), upload(random_image(256, 256, seed=14))],
        prompt=PROMPT,
        extra_body={"seed": 4},
    )

    assert response.size == "96x64"
    assert [image.size for image in images_of(response)] == [(96, 64)]


def test_edit_takes_extra_reference_urls_as_repeated_fields(
    client: openai.OpenAI, engine: Pipeline, reference: Image.Image, others: tuple[Image.Image, Image.Image]
) -> None:
    """The SDK sends a list in extra_body as repeated `images[]` multipart fields: all are references."""
    response = client.images.edit(
        model=MODEL,
        image=upload(reference),
        prompt=PROMPT,
        size="256x256",
        extra_body={"seed": 3, "images": [data_url(image) for image in others]},
    )

    assert response.usage is not None and response.usage.input_tokens_details.image_tokens == 24 + 512 + 512
    [image] = images_of(response)
    assert max_difference(image, alone(engine, seed=3, references=(reference, *others))) <= 1


def test_edit_takes_a_data_url_reference_over_one_megabyte(
    client: openai.OpenAI, reference: Image.Image
) -> None:
    """A text field as large as a JSON body may carry (starlette would refuse parts over 1 MiB)."""
    large = data_url(random_image(640, 640, seed=15))
    assert len(large) > 1024 * 1024
    response = client.images.edit(
        model=MODEL, image=upload(reference), prompt=PROMPT, size="256x256", extra_body={"images": [large]}
    )

    assert response.usage is not None
    assert response.usage.input_tokens_details.image_tokens == 24 + (640 // 16) ** 2


# 5 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "arguments"),
    [
        ("n", {"n": 5}),
        ("prompt", {"prompt": ""}),
        ("prompt", {"prompt": "   "}),
        ("size", {"size": "999999x2"}),
        ("size", {"size": "big"}),
        ("output_format", {"output_format": "gif"}),
        ("seed", {"extra_body": {"seed": -1}}),
        ("num_inference_steps", {"extra_body": {"num_inference_steps": 13}}),
    ],
)
def test_bad_generation_fields_are_named(
    client: openai.OpenAI, field: str, arguments: dict[str, Any]
) -> None:
    request: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "size": "256x256", **arguments}
    error, message = bad_request(lambda: client.images.generate(**request))

    assert error["param"] == field
    assert error["code"] == "invalid_input"
    assert field in error["message"]
    assert error["message"] in message


def test_edit_with_an_undecodable_image_names_it(client: openai.OpenAI) -> None:
    error, _ = bad_request(
        lambda: client.images.edit(model=MODEL, image=("a.png", b"not a png", "image/png"), prompt=PROMPT)
    )

    assert error["param"] == "image[0]"


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as generating:
        client.images.generate(model="dall-e-3", prompt=PROMPT, size="256x256")
    with pytest.raises(openai.NotFoundError) as retrieving:
        client.models.retrieve("dall-e-3")

    for caught in (generating, retrieving):
        assert caught.value.status_code == 404
        body = caught.value.body
        assert isinstance(body, dict)
        assert body["code"] == "model_not_found"
        assert body["param"] == "model"
        assert "dall-e-3" in body["message"] and MODEL in body["message"]


# 6 -------------------------------------------------------------------------------------------------------


def test_streamed_generation_sends_partials_then_the_final_image(
    client: openai.OpenAI, engine: Pipeline
) -> None:
    stream = client.images.generate(
        model=MODEL, prompt=PROMPT, size="256x256", stream=True, partial_images=2, extra_body={"seed": 9}
    )
    events = list(stream)

    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    for event in events:  # each event is complete by the SDK's own (strict) model
        assert type(event).model_validate(event.to_dict()) == event
    partials = [event for event in events if event.type == "image_generation.partial_image"]
    assert [event.partial_image_index for event in partials] == [0, 1]
    for event in partials:
        assert event.size == "256x256"
        assert decode_b64(event.b64_json).size == (256, 256)
    final = events[-1]
    assert final.type == "image_generation.completed"
    assert final.size == "256x256" and final.output_format == "png"
    assert final.to_dict()["seed"] == 9
    assert final.usage.output_tokens == (256 // 16) ** 2
    image = decode_b64(final.b64_json)
    [unstreamed] = images_of(
        client.images.generate(model=MODEL, prompt=PROMPT, size="256x256", extra_body={"seed": 9})
    )
    assert max_difference(image, unstreamed) == 0
    assert max_difference(image, alone(engine, seed=9)) <= 1
    # previews are estimates on the way to the final image, not the image itself
    assert max_difference(decode_b64(partials[0].b64_json), image) > 1


def test_streamed_edit_uses_image_edit_events(client: openai.OpenAI, reference: Image.Image) -> None:
    common: dict[str, Any] = {"model": MODEL, "image": upload(reference), "prompt": PROMPT, "size": "256x256"}
    events = list(client.images.edit(**common, stream=True, partial_images=1, extra_body={"seed": 6}))

    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    for event in events:
        assert type(event).model_validate(event.to_dict()) == event
    assert events[0].type == "image_edit.partial_image" and events[0].partial_image_index == 0
    final = events[-1]
    assert final.type == "image_edit.completed"
    assert final.usage.input_tokens_details.image_tokens == 24
    [unstreamed] = images_of(client.images.edit(**common, extra_body={"seed": 6}))
    assert max_difference(decode_b64(final.b64_json), unstreamed) == 0


def test_stream_with_n_images_and_no_partials(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        model=MODEL,
        prompt=PROMPT,
        size="256x256",
        n=2,
        stream=True,
        partial_images=0,
        extra_body={"seed": 30},
    )
    events = list(stream)

    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert [event.to_dict()["seed"] for event in events] == [30, 31]


def test_overload_is_a_rate_limit_error_streaming_or_not(start_server: Callable[..., RunningServer]) -> None:
    """No room in the queue: 429 with Retry-After and OpenAI's error body, for `stream: true` too (a stream
    is submitted before it starts, so a refusal is no 200 with an `error` event)."""
    full = start_server(max_waiting=0)
    with openai.OpenAI(base_url=full.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as caught:
                sdk.images.generate(model=MODEL, prompt=PROMPT, size="256x256", stream=stream)
            assert caught.value.response.headers["retry-after"].isdigit()
            assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "overloaded"
            assert "waiting" in caught.value.body["message"]


# 7 -------------------------------------------------------------------------------------------------------


def test_models_list_and_retrieve_publish_the_parameter_schema(client: openai.OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    assert MODEL in listed
    assert listed[MODEL].owned_by == "black-forest-labs"

    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    assert card.model_extra is not None
    schema = card.model_extra["parameters"]
    properties = schema["properties"]
    assert schema["required"] == ["prompt"]
    [n_range] = [option for option in properties["n"]["anyOf"] if option.get("type") == "integer"]
    assert (n_range["minimum"], n_range["maximum"]) == (1, 4)
    assert properties["num_inference_steps"]["default"] == 4
    assert properties["guidance_scale"]["readOnly"] is True  # distilled: a guidance sent is ignored
    assert properties["output_compression"]["default"] == 100
    assert properties["size"]["default"] == "1024x1024"  # the model's default side
    # ids with slashes work as path segments too
    assert (
        client.models.retrieve("black-forest-labs/FLUX.2-klein-4B").id == "black-forest-labs/FLUX.2-klein-4B"
    )


# 8 -------------------------------------------------------------------------------------------------------


def test_unknown_fields_are_ignored(client: openai.OpenAI, engine: Pipeline) -> None:
    typed = client.images.generate(
        model=MODEL, prompt=PROMPT, size="256x256", quality="high", style="vivid", extra_body={"seed": 8}
    )
    extra = client.images.generate(
        model=MODEL,
        prompt=PROMPT,
        size="256x256",
        extra_body={"seed": 8, "quality": "high", "style": "vivid", "moderation": "low", "x_unknown": [1]},
    )

    expected = alone(engine, seed=8)
    for response in (typed, extra):
        [image] = images_of(response)
        assert max_difference(image, expected) <= 1


def test_usage_counts_the_prompts_tokens_not_the_padding(client: openai.OpenAI, engine: Pipeline) -> None:
    """The tiny model reads up to 512 tokens (one per byte): a short prompt is its template and its bytes, a
    long one is cut where the encoder cuts it, also at a smaller max_sequence_length."""
    short = client.images.generate(model=MODEL, prompt="x", size="256x256", extra_body={"seed": 1})
    long_prompt = "a red fox in the snow " * 40  # 880 bytes
    long = client.images.generate(model=MODEL, prompt=long_prompt, size="256x256", extra_body={"seed": 1})
    cut = client.images.generate(
        model=MODEL, prompt=long_prompt, size="256x256", extra_body={"seed": 1, "max_sequence_length": 64}
    )

    assert short.usage is not None and long.usage is not None and cut.usage is not None
    assert short.usage.input_tokens_details.text_tokens == prompt_tokens(engine, "x") == 26
    assert prompt_tokens(engine, long_prompt) > 512
    assert long.usage.input_tokens_details.text_tokens == 512
    assert cut.usage.input_tokens_details.text_tokens == 64
    assert short.usage.input_tokens == 26
    assert short.usage.total_tokens == 26 + (256 // 16) ** 2


def test_transparent_background_is_answered_opaque_with_a_warning(
    client: openai.OpenAI, engine: Pipeline
) -> None:
    transparent = client.images.generate(
        model=MODEL, prompt=PROMPT, size="256x256", background="transparent", extra_body={"seed": 8}
    )
    opaque = client.images.generate(
        model=MODEL, prompt=PROMPT, size="256x256", background="opaque", extra_body={"seed": 8}
    )
    plain = client.images.generate(model=MODEL, prompt=PROMPT, size="256x256", extra_body={"seed": 8})

    assert transparent.background == opaque.background == plain.background == "opaque"
    assert transparent.model_extra is not None
    assert transparent.model_extra["warnings"] == [
        {
            "type": "unsupported",
            "param": "background",
            "message": "transparent backgrounds are not supported: the image is opaque",
        }
    ]
    for response in (opaque, plain):
        assert response.model_extra is not None and "warnings" not in response.model_extra
    [image] = images_of(transparent)
    assert image.mode == "RGB"  # no alpha channel
    assert max_difference(image, alone(engine, seed=8)) <= 1
    wire, _ = bad_request(
        lambda: client.images.generate(
            model=MODEL, prompt=PROMPT, size="256x256", extra_body={"background": "checkered"}
        )
    )
    assert wire["param"] == "background"


# 9 -------------------------------------------------------------------------------------------------------


def test_data_url_reference_on_generations(
    client: openai.OpenAI, engine: Pipeline, reference: Image.Image
) -> None:
    response = client.images.generate(
        model=MODEL, prompt=PROMPT, extra_body={"seed": 2, "images": [data_url(reference)]}
    )

    assert response.size == "96x64"
    [image] = images_of(response)
    assert image.size == (96, 64)
    assert response.usage is not None and response.usage.input_tokens_details.image_tokens == 24
    expected = alone(engine, seed=2, width=None, height=None, references=(reference,))
    assert max_difference(image, expected) <= 1


# output formats ------------------------------------------------------------------------------------------


def test_jpeg_output_defaults_to_compression_100(client: openai.OpenAI) -> None:
    def jpeg(**compression: int) -> bytes:
        response = client.images.generate(
            model=MODEL,
            prompt=PROMPT,
            size="256x256",
            output_format="jpeg",
            extra_body={"seed": 1},
            **compression,
        )
        assert response.output_format == "jpeg"
        assert response.data is not None and response.data[0].b64_json is not None
        data = base64.b64decode(response.data[0].b64_json)
        assert data.startswith(b"\xff\xd8") and Image.open(io.BytesIO(data)).size == (256, 256)
        return data

    default = jpeg()
    assert default == jpeg(output_compression=100)
    assert len(jpeg(output_compression=30)) < len(default)


def test_a_step_without_a_preview_sends_no_partial_image() -> None:
    # A worker in another process may remove a job's preview before the API process reads it (seen in
    # tests/scale/test_multiprocess.py: the stream died on an IndexError); that step then has none.
    async def steps() -> asyncio.Queue[list[Image.Image]]:
        previews: asyncio.Queue[list[Image.Image]] = asyncio.Queue()
        on_step = _send_previews(previews, partial_images=3)
        image = Image.new("RGB", (8, 8))
        for step in range(1, 5):
            on_step(Progress(step, 4, 0.0, preview=lambda step=step: [image] if step == 2 else []))
        await asyncio.sleep(0)  # the queued puts run
        return previews

    previews = asyncio.run(steps())
    assert previews.qsize() == 1 and previews.get_nowait()[0].size == (8, 8)
