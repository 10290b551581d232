"""Masks and strength on the wire (issue 18): each dialect's mask convention and `strength` reach the job as
GenerateRequest.mask / .strength, through the real clients (the official `openai` SDK, the Vercel AI SDK
under Node) and raw HTTP, against the live loopback server; bad values are refused in each dialect's error
shape, and the server keeps serving.

The image edited is a 128x96 scene (sides multiples of 16: the output has exactly its size). What the server
makes is compared with this module's engine for the same request with the mask in kleinserve's convention
("L", 255 repaints): pixel equality shows the conversion is right. The tiny model's VAE is random, so the
input image does not survive encoding even where nothing is repainted; "kept outside the mask" is checked as
"the same whatever the seed", away from the box's edge (the decoder's attention spreads a little everywhere).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image, ImageDraw

from kleinserve.engine import Pipeline
from kleinserve.types import GenerateRequest
from tests.api.conftest import RunningServer, run_sdk
from tests.conftest import max_difference, pixels

PROMPT = "a blue circle"
SIZE = (128, 96)
BOX = (64, 32, 111, 79)  # left, top, right, bottom (inclusive): the region repainted
EDGE = 16  # pixels around the box left out of "outside"
GATEWAY_HEADERS = {"ai-model-id": "bfl/flux-2-klein-4b", "ai-image-model-specification-version": "3"}


# --- images -----------------------------------------------------------------------------------------------


def scene(size: tuple[int, int] = SIZE) -> Image.Image:
    """The image edited: a sky-blue field with a yellow disc, left of the box."""
    image = Image.new("RGB", size, (40, 120, 200))
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=(230, 200, 30))
    return image


def diffusers_mask(size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] | None = BOX) -> Image.Image:
    """kleinserve's (and BFL's fill) convention: "L", white (255) inside `box` is repainted, black kept (no
    box: all black, nothing to repaint)."""
    mask = Image.new("L", size, 0)
    if box is not None:
        ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def openai_mask(size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] | None = BOX) -> Image.Image:
    """OpenAI's convention: RGBA, fully transparent inside `box` (repainted), opaque black elsewhere."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    if box is not None:
        ImageDraw.Draw(mask).rectangle(box, fill=(0, 0, 0, 0))
    return mask


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def decoded(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    image.load()
    return image


def regions() -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) boolean pixel masks: the box, and what lies over EDGE pixels away from it."""
    inside = np.asarray(diffusers_mask()) >= 128
    near = np.zeros_like(inside)
    left, top, right, bottom = BOX
    near[max(0, top - EDGE) : bottom + EDGE + 1, max(0, left - EDGE) : right + EDGE + 1] = True
    return inside, ~near


def mean_difference(a: Image.Image, b: Image.Image, where: np.ndarray) -> float:
    return float(np.abs(pixels(a) - pixels(b))[where].mean())


@pytest.fixture(scope="module")
def made(pipeline: Pipeline) -> Callable[..., Image.Image]:
    """The engine's image for the scene edited with `diffusers_mask()` (or none) and `strength`."""

    def make(seed: int, strength: float | None = None, masked: bool = True) -> Image.Image:
        request = GenerateRequest(
            PROMPT,
            seed=seed,
            reference_images=(scene(),),
            mask=diffusers_mask() if masked else None,
            strength=strength,
        )
        return pipeline.generate(request).images[0].image

    return make


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def job_params(server: RunningServer, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/v1/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    params: dict[str, Any] = response.json()["params"]
    return params


# --- the real clients -------------------------------------------------------------------------------------


def test_openai_sdk_edit_with_a_mask_and_strength(
    server: RunningServer, client: openai.OpenAI, made: Callable[..., Image.Image]
) -> None:
    """`images.edit(image, mask)`: the transparent box is what is repainted, at the image's own size."""
    answers = [
        client.images.edit(
            model="flux-2-klein-4b",
            image=("scene.png", png(scene()), "image/png"),
            mask=("mask.png", png(openai_mask()), "image/png"),
            prompt=PROMPT,
            extra_body={"seed": seed, "strength": 0.8},
        )
        for seed in (3, 4)
    ]

    assert [answer.size for answer in answers] == ["128x96", "128x96"]
    first, second = (decoded(answer.data[0].b64_json or "") for answer in answers if answer.data)
    assert first.size == SIZE
    assert max_difference(first, made(3, 0.8)) <= 1
    inside, outside = regions()
    assert mean_difference(first, second, outside) * 4 < mean_difference(first, second, inside)
    params = job_params(server, str(answers[0].to_dict()["id"]))
    assert params["mask"] is True
    assert params["strength"] == 0.8
    assert (params["width"], params["height"]) == SIZE


def test_openai_strength_without_a_mask_edits_the_whole_image(
    server: RunningServer, made: Callable[..., Image.Image]
) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/images/edits",
        files={"image": ("scene.png", png(scene()), "image/png")},
        data={"prompt": PROMPT, "seed": "5", "strength": "0.5", "size": "auto"},
        timeout=60,
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert max_difference(decoded(body["data"][0]["b64_json"]), made(5, 0.5, masked=False)) <= 1
    params = job_params(server, body["id"])
    assert params["mask"] is False
    assert params["strength"] == 0.5


def test_openai_json_generation_with_image_and_mask(
    server: RunningServer, made: Callable[..., Image.Image]
) -> None:
    """`image` and `mask` as a data URL and bare base64 on /v1/images/generations; a size equal to the
    image's (floored to multiples of 16, as every size) is accepted."""
    url = f"{server.base_url}/v1/images/generations"
    body = {
        "prompt": PROMPT,
        "seed": 3,
        "strength": 0.8,
        "size": "auto",
        "image": data_url(png(scene())),
        "mask": b64(png(openai_mask())),
    }
    response = httpx.post(url, json=body, timeout=60)
    large = {
        "image": b64(png(scene((280, 260)))),
        "mask": b64(png(openai_mask((280, 260)))),
        "size": "272x256",
    }
    sized = httpx.post(url, json={**body, **large}, timeout=60)

    assert response.status_code == 200, response.text
    assert max_difference(decoded(response.json()["data"][0]["b64_json"]), made(3, 0.8)) <= 1
    assert sized.status_code == 200, sized.text
    assert sized.json()["size"] == "272x256"


def test_openai_mask_url_goes_through_the_fetchers_address_policy(server: RunningServer) -> None:
    body = {"prompt": PROMPT, "image": data_url(png(scene())), "mask": "http://127.0.0.1:9/mask.png"}
    response = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=60)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "mask"
    assert "non-public" in error["message"]


def test_ai_sdk_mask_edits(
    server: RunningServer, node: str, tmp_path: Path, made: Callable[..., Image.Image]
) -> None:
    """`generateImage({prompt: {text, images, mask}})`: `@ai-sdk/openai-compatible` sends multipart `mask`
    (OpenAI's transparent mask); `@ai-sdk/gateway` sends `mask` as a base64 file, here in BFL's convention
    (white repaints) and in OpenAI's: all three make the same image."""
    image_path, transparent_path, white_path = (tmp_path / name for name in ("s.png", "t.png", "w.png"))
    image_path.write_bytes(png(scene()))
    transparent_path.write_bytes(png(openai_mask()))
    white_path.write_bytes(png(diffusers_mask()))
    call = {"prompt": PROMPT, "images": [str(image_path)]}
    options = {"seed": 3, "strength": 0.8}
    (compatible,) = run_sdk(
        node,
        "openai-compatible",
        server.base_url,
        {**call, "mask": str(transparent_path), "providerOptions": {"kleinserve": options}},
    )
    white, transparent = run_sdk(
        node,
        "gateway",
        server.base_url,
        *(
            {**call, "mask": str(path), "seed": 3, "providerOptions": {"kleinserve": {"strength": 0.8}}}
            for path in (white_path, transparent_path)
        ),
    )

    (request,) = compatible["requests"]
    parts = {part["name"]: part for part in request["form"]}
    assert parts["mask"]["file"]["type"] == "image/png"
    assert parts["strength"]["value"] == "0.8"
    (gateway_request,) = white["requests"]
    assert gateway_request["json"]["mask"] == {
        "type": "file",
        "mediaType": "image/png",
        "data": b64(white_path.read_bytes()),
    }
    expected = made(3, 0.8)
    for result in (compatible, white, transparent):
        assert "error" not in result, result["error"]
        (image,) = result["images"]
        assert max_difference(decoded(image["base64"]), expected) <= 1


def test_bfl_image_prompt_mask_and_strength(server: RunningServer, made: Callable[..., Image.Image]) -> None:
    """kleinserve's BFL extension: `image_prompt` is edited where `mask` is white; `input_image` follows
    it as a reference (its size counted as input)."""
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = {
            "prompt": PROMPT,
            "seed": 3,
            "strength": 0.8,
            "output_format": "png",
            "image_prompt": b64(png(scene())),
            "mask": data_url(png(diffusers_mask())),
        }
        submitted = http.post("/v1/flux-2-klein-4b", json=body)
        assert submitted.status_code == 200, submitted.text
        result = bfl_result(http, submitted.json()["polling_url"])
        with_reference = http.post(
            "/v1/flux-2-klein-4b", json={**body, "input_image": b64(png(scene((64, 64))))}
        )
        assert with_reference.status_code == 200, with_reference.text
        bfl_result(http, with_reference.json()["polling_url"])
        # BFL's fill convention (and the AI SDK's BFL provider): `input_image` + `mask`, no image_prompt
        fill = {**body, "input_image": body["image_prompt"], "image_prompt": None}
        as_fill = http.post("/v1/flux-2-klein-4b", json=fill)
        assert as_fill.status_code == 200, as_fill.text
        filled = bfl_result(http, as_fill.json()["polling_url"])

    sample = http_image(result["sample"])
    assert max_difference(sample, made(3, 0.8)) <= 1
    assert http_image(filled["sample"]).tobytes() == sample.tobytes()
    params = job_params(server, submitted.json()["id"])
    assert params["mask"] is True and params["strength"] == 0.8
    assert job_params(server, with_reference.json()["id"])["reference_sizes"] == [[128, 96], [64, 64]]


def bfl_result(http: httpx.Client, polling_url: str) -> dict[str, Any]:
    """The `result` of a BFL job once Ready (fails on Error or after 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = http.get(polling_url).json()
        assert answer["status"] in ("Pending", "Ready"), answer
        if answer["status"] == "Ready":
            result: dict[str, Any] = answer["result"]
            return result
        time.sleep(0.05)
    raise AssertionError("the BFL job did not finish within 30 s")


def http_image(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


# --- bad input, in each dialect's shape -------------------------------------------------------------------

# What each bad case changes, in dialect-neutral words; each dialect's `send` writes it in its own fields:
# `mask` is (size, box) drawn in the dialect's convention (box None: nothing to repaint) or raw file bytes.
GOOD_MASK = (SIZE, BOX)
BAD_CASES: dict[str, dict[str, Any]] = {
    "mask of another size": {"mask": ((64, 48), (8, 8, 40, 40))},
    "mask not an image": {"mask": b"not an image"},
    "mask without an image": {"image": None},
    "nothing to repaint": {"mask": (SIZE, None)},
    "strength 0": {"strength": 0},
    "strength 1.5": {"strength": 1.5},
    "strength x": {"strength": "x"},
    "size not the image's": {"size": (256, 256)},
}


def mask_bytes(case: dict[str, Any], convention: Callable[..., Image.Image]) -> bytes:
    """The case's mask as PNG bytes: drawn by `convention` (openai_mask, diffusers_mask), or raw bytes."""
    mask = case.get("mask", GOOD_MASK)
    return mask if isinstance(mask, bytes) else png(convention(*mask))


def openai_edit(base_url: str, case: dict[str, Any]) -> httpx.Response:
    files = {"mask": ("mask.png", mask_bytes(case, openai_mask), "image/png")}
    if case.get("image", True) is not None:
        files["image"] = ("scene.png", png(scene()), "image/png")
    data = {"prompt": PROMPT, "seed": "1", "strength": str(case.get("strength", 0.8))}
    if "size" in case:
        data["size"] = "{}x{}".format(*case["size"])
    return httpx.post(f"{base_url}/v1/images/edits", files=files, data=data, timeout=60)


def openai_json(base_url: str, case: dict[str, Any]) -> httpx.Response:
    body: dict[str, Any] = {
        "prompt": PROMPT,
        "seed": 1,
        "strength": case.get("strength", 0.8),
        "mask": data_url(mask_bytes(case, openai_mask)),
    }
    if case.get("image", True) is not None:
        body["image"] = data_url(png(scene()))
    if "size" in case:
        body["size"] = "{}x{}".format(*case["size"])
    return httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=60)


def bfl(base_url: str, case: dict[str, Any]) -> httpx.Response:
    body: dict[str, Any] = {
        "prompt": PROMPT,
        "seed": 1,
        "strength": case.get("strength", 0.8),
        "mask": b64(mask_bytes(case, diffusers_mask)),
    }
    if case.get("image", True) is not None:
        body["image_prompt"] = b64(png(scene()))
    if "size" in case:
        body["width"], body["height"] = case["size"]
    return httpx.post(f"{base_url}/v1/flux-2-klein-4b", json=body, timeout=60)


def gateway(base_url: str, case: dict[str, Any]) -> httpx.Response:
    def file(data: bytes) -> dict[str, str]:
        return {"type": "file", "mediaType": "image/png", "data": b64(data)}

    body: dict[str, Any] = {
        "prompt": PROMPT,
        "seed": 1,
        "providerOptions": {"kleinserve": {"strength": case.get("strength", 0.8)}},
        "mask": file(mask_bytes(case, diffusers_mask)),
    }
    if case.get("image", True) is not None:
        body["files"] = [file(png(scene()))]
    if "size" in case:
        body["size"] = "{}x{}".format(*case["size"])
    return httpx.post(f"{base_url}/image-model", json=body, headers=GATEWAY_HEADERS, timeout=60)


def openai_error(response: httpx.Response) -> tuple[str | None, str]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error["param"], error["message"]


def bfl_error(response: httpx.Response) -> tuple[str | None, str]:
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"][0] == "body" and detail["type"] == "value_error"
    return detail["loc"][-1], detail["msg"]


DIALECTS: dict[str, tuple[Callable[[str, dict[str, Any]], httpx.Response], Callable[..., Any]]] = {
    "openai-edits": (openai_edit, openai_error),
    "openai-generations": (openai_json, openai_error),
    "bfl": (bfl, bfl_error),
    "gateway": (gateway, openai_error),
}
# The parameter each dialect names where it differs from the case's own ("mask" or "strength").
PARAMS = {
    ("openai-edits", "mask without an image"): "image",
    ("openai-edits", "size not the image's"): "size",
    ("openai-generations", "size not the image's"): "size",
    ("bfl", "size not the image's"): "width",
    ("gateway", "size not the image's"): "size",
    **{("gateway", f"strength {v}"): "providerOptions.kleinserve.strength" for v in ("0", "1.5", "x")},
}
# Words the message must have where the parameter alone does not say what is wrong.
WORDS = {"nothing to repaint": "nothing to repaint", "mask of another size": "64x48"}


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("dialect", DIALECTS)
def test_bad_masks_and_strengths_are_refused_in_the_callers_dialect(
    server: RunningServer, dialect: str, case: str
) -> None:
    send, error_of = DIALECTS[dialect]
    param, message = error_of(send(server.base_url, BAD_CASES[case]))

    assert param == PARAMS.get((dialect, case), "strength" if case.startswith("strength") else "mask")
    assert WORDS.get(case, param) in message
    if case == "size not the image's":
        assert "128x96" in message  # the size the image gives
    assert send(server.base_url, {}).status_code == 200  # and the next request is served


def test_openai_mask_without_transparency_is_refused(server: RunningServer) -> None:
    """OpenAI's mask marks what to repaint by transparency: an opaque-only image cannot be one."""
    param, message = openai_error(
        openai_edit(server.base_url, {"mask": png(Image.new("RGB", SIZE, "white"))})
    )

    assert param == "mask"
    assert "transparency" in message
