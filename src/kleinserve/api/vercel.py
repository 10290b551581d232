"""Vercel AI Gateway image model: POST /image-model, as `@ai-sdk/gateway` calls it.

Headers `ai-model-id` (e.g. `bfl/flux-2-klein-4b`) and `ai-image-model-specification-version: 3`; JSON body
`{prompt, n, size?, aspectRatio?, seed?, providerOptions?, files?: [{type: "file", mediaType, data} |
{type: "url", url}], mask?}`; answer `{"images": ["<base64>", ...], "warnings": [...]}`. Provider options
under any provider key may set `steps`, `guidance`, `negative_prompt`, `output_format`, `strength` and `loras`
(api/loras.py's array: `providerOptions: {kleinserve: {loras: [{name: "watercolour", scale: 0.8}]}}`).

`mask` (a file like those of `files`, the size of the first, which it edits) may follow either convention, as
the AI SDK passes a mask to each provider as it is: one with fully transparent pixels repaints those
(OpenAI's), any other repaints its white (BFL's fill). `strength` (0 < s <= 1) is image-to-image from the
first file, with or without a mask; with either, the output has the first file's size.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, Field

from kleinserve.api import openapi, service
from kleinserve.api._dialect import (
    MAX_PROMPT_CHARS,
    DialectRoute,
    check_prompt,
    error_body,
    error_headers,
    parse_size,
)
from kleinserve.api.service import Services
from kleinserve.errors import (
    Forbidden,
    InvalidInput,
    KleinError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnknownModel,
)
from kleinserve.media import decode_base64_image
from kleinserve.types import GenerateRequest, ImageFormat, LoraChoice, base64_text

_MODEL_HEADER = {
    "name": "ai-model-id",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "default": "bfl/flux-2-klein-4b"},
    "description": "the model asked for; absent: the served klein model",
}
_OPTION_KEYS = {"steps", "guidance", "negative_prompt", "output_format", "strength", "loras"}
MAX_PIXELS = 1024 * 1024


class ImageModelFile(BaseModel):
    type: Literal["file", "url"]
    mediaType: str | None = Field(None, examples=["image/png"])  # noqa: N815 (the wire's name)
    data: str | None = Field(None, description='base64, with type "file"')
    url: str | None = Field(None, description='with type "url"')


class ImageModelBody(BaseModel):
    """The body `@ai-sdk/gateway` sends, for the OpenAPI document: the route reads the body field by field,
    to refuse each value in the Gateway's words."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=4)
    size: str | None = Field(None, description='"WxH", 256-2048 px per side', examples=["1024x768"])
    aspectRatio: str | None = Field(None, description='"W:H" up to 4:1', examples=["16:9"])  # noqa: N815
    seed: int | None = Field(None, ge=0)
    providerOptions: dict[str, dict[str, Any]] | None = Field(  # noqa: N815
        None,
        description="under any provider key: steps, guidance, negative_prompt, output_format, strength, "
        "loras",
    )
    files: list[ImageModelFile] | None = Field(None, max_length=4, description="reference images")
    mask: ImageModelFile | None = Field(
        None, description="repaints its transparent pixels (if any), else its white; the first file's size"
    )


def size_for_aspect_ratio(text: str) -> tuple[int, int]:
    """About one megapixel at the ratio "W:H", sides multiples of 16."""
    try:
        w, h = (float(part) for part in text.split(":"))  # float() also reads "nan" and "inf"
        if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0 and max(w / h, h / w) <= 4):
            raise ValueError
    except ValueError:
        raise InvalidInput(f"aspectRatio {text!r}", param="aspectRatio", allowed='"W:H" up to 4:1') from None
    height = math.sqrt(MAX_PIXELS * h / w)
    return int(height * w / h) // 16 * 16, int(height) // 16 * 16


def _size(body: dict[str, Any]) -> tuple[int | None, int | None, str]:
    """(width, height) in pixels asked for (None: the first file's size, else the default) and the field
    that asked."""
    if size := body.get("size"):
        return *parse_size(str(size), MAX_PIXELS), "size"  # the cap of its aspect ratios
    if ratio := body.get("aspectRatio"):
        return *size_for_aspect_ratio(str(ratio)), "aspectRatio"
    return None, None, "size"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Which JSON type each provider option must have, and the words that say so.
_OPTION_TYPES = {
    "steps": (_is_int, "an integer"),
    "guidance": (_is_number, "a number"),
    "negative_prompt": (lambda value: isinstance(value, str), "a string"),
    "output_format": (lambda value: isinstance(value, str), '"png", "jpeg" or "webp"'),
    "strength": (lambda value: _is_number(value) and 0 < value <= 1, "a number, 0 < strength <= 1"),
    "loras": (lambda value: isinstance(value, list), 'an array of {"name" | "url", "scale"?}'),
}


def provider_options(body: dict[str, Any], warnings: list[dict[str, str]]) -> dict[str, Any]:
    """The options kleinserve understands, from under any provider key; others are ignored with a warning.
    An option of the wrong JSON type is refused here rather than failing inside the engine."""
    given = body.get("providerOptions") or {}
    if not isinstance(given, dict):
        raise InvalidInput("providerOptions must be an object", param="providerOptions")
    merged: dict[str, Any] = {}
    for provider, options in given.items():
        if not isinstance(options, dict):
            raise InvalidInput(
                f"providerOptions.{provider} must be an object", param=f"providerOptions.{provider}"
            )
        for key, value in options.items():
            if key not in _OPTION_KEYS:
                warnings.append({"type": "other", "message": f"providerOptions.{provider}.{key} is ignored"})
                continue
            if value is None:
                continue
            check, allowed = _OPTION_TYPES[key]
            if not check(value):
                param = f"providerOptions.{provider}.{key}"
                raise InvalidInput(f"{param} {value!r}", param=param, allowed=allowed)
            merged[key] = value
    return merged


def to_request(
    body: dict[str, Any],
    references: list[Any],
    options: dict[str, Any],
    loras: tuple[LoraChoice, ...] = (),
    mask: Image.Image | None = None,
) -> GenerateRequest:
    """The internal request, with the adapters of `options["loras"]` (AdapterSource.choices) and `mask` in
    kleinserve's convention (an "L" image, or None); `steps`/`guidance` apply only where the loaded variant
    leaves them free, as on the gateway's hosted klein (`fixed_by_variant`)."""
    prompt = check_prompt(body.get("prompt"))
    n = body.get("n", 1)
    if not _is_int(n) or not 1 <= n <= 4:
        raise InvalidInput(f"n {n!r} is out of range", param="n", allowed="1-4")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InvalidInput(f"seed {seed!r}", param="seed", allowed="a non-negative integer")
    output_format = ImageFormat.parse(str(options.get("output_format", "png")))
    width, height, size_param = _size(body)
    strength = options.get("strength")
    editing = mask is not None or strength is not None
    width, height = service.requested_size(references, width, height, size_param, editing)
    return GenerateRequest(
        prompt=prompt,
        width=width,
        height=height,
        steps=options.get("steps"),
        guidance=options.get("guidance"),
        seed=seed,
        num_images=n,
        reference_images=tuple(references),
        negative_prompt=str(options.get("negative_prompt", "")),
        output_format=output_format,
        fixed_by_variant=True,
        loras=loras,
        mask=mask,
        strength=None if strength is None else float(strength),
    )


async def _file_image(services: Services, file: Any, param: str) -> Image.Image:
    """The image of one of the body's file objects: `{type: "url", url}` fetched (the fetcher's address
    policy), `{type: "file", data: <base64 or data URL>}` decoded; InvalidInput naming `param` otherwise."""
    if isinstance(file, dict) and file.get("type") == "url":
        return await services.fetcher.image(str(file.get("url", "")), param)
    if isinstance(file, dict) and isinstance(file.get("data"), str):
        return await asyncio.to_thread(decode_base64_image, file["data"], param)
    raise InvalidInput(f"{param} is neither a base64 file nor a URL", param=param)


def error_type(exc: KleinError) -> str:
    """The AI Gateway's error types, which `@ai-sdk/gateway` maps to its error classes
    (GatewayInvalidRequestError, GatewayModelNotFoundError, ...); an unknown type would become
    GatewayInternalServerError whatever the status."""
    if isinstance(exc, UnknownModel):
        return "model_not_found"
    if isinstance(exc, InvalidInput | PayloadTooLarge | NotFound | MethodNotAllowed):
        return "invalid_request_error"
    if isinstance(exc, Unauthorized):
        return "authentication_error"
    if isinstance(exc, Forbidden):
        return "forbidden"
    if isinstance(exc, Overloaded) and exc.status == 429:
        return "rate_limit_exceeded"
    return "internal_server_error"


def render_error(exc: KleinError) -> Response:
    """OpenAI's error body with the Gateway's error types."""
    return service.JSONBody(
        error_body(exc, error_type(exc)), status_code=exc.status, headers=error_headers(exc)
    )


class GatewayRoute(DialectRoute):
    def render_error(self, exc: KleinError) -> Response:
        return render_error(exc)


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["Vercel AI Gateway"], route_class=GatewayRoute)

    @router.post(
        "/image-model",
        summary="Generate images (AI Gateway image model protocol, version 3)",
        openapi_extra={**openapi.json_body(ImageModelBody), "parameters": [_MODEL_HEADER]},
        responses=openapi.errors(openapi.ErrorBody, (400, 401, 404, 413, 429, 503)),
    )
    async def image_model(http_request: Request) -> dict[str, Any]:
        owner = service.caller(services, http_request)
        services.check_model(http_request.headers.get("ai-model-id"))
        body = await service.read_json_object(http_request)
        warnings: list[dict[str, str]] = []
        options = provider_options(body, warnings)
        files = body.get("files") or []
        if not isinstance(files, list):
            raise InvalidInput("files must be an array", param="files", allowed="a list of 0-4 files")
        if len(files) > 4:
            raise InvalidInput(f"{len(files)} files given", param="files", allowed="at most 4")
        references = [await _file_image(services, file, f"files[{i}]") for i, file in enumerate(files)]
        mask = None
        if body.get("mask") is not None:
            given = await _file_image(services, body["mask"], "mask")
            mask = await asyncio.to_thread(service.either_mask, given, "mask")
        loras = await services.loras.choices(options.get("loras"))
        request = to_request(body, references, options, loras, mask)
        completed = await service.generate(services, http_request, owner, request)
        return {
            "images": [base64_text(data) for data in completed.images],
            "warnings": warnings,
            "providerMetadata": {
                "kleinserve": {
                    "job": completed.job.id,
                    "images": [{"seed": seed} for seed in completed.result.seeds],
                }
            },
        }

    return router
