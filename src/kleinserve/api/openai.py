"""OpenAI Images API: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart), GET /v1/models.

Fields follow OpenAI's Images API plus the klein extensions hosted klein endpoints accept (wire-formats.md
section 3); the pydantic model below is the contract and `GET /v1/models/{id}` publishes it as JSON Schema.
Unknown fields are ignored. Sizes that are not multiples of 16 are rounded down and the response's `size`
says what was made. `stream: true` answers Server-Sent Events with `partial_images` previews.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from kleinserve.api import service
from kleinserve.api.service import Completed, Services
from kleinserve.errors import InvalidInput, KleinError, Overloaded
from kleinserve.media import decode_image
from kleinserve.types import GenerateRequest, ImageFormat, Progress, base64_text, json_bytes

PREFIXES = ("/v1/images", "/v1/models")
MAX_PROMPT_CHARS = 32000
MAX_AREA = 1024 * 1024
DEFAULT_COMPRESSION = 100  # OpenAI's default for output_compression (jpeg/webp quality)
# Multipart text fields may carry data-URL references as large as in JSON bodies (starlette's default limit
# is 1 MiB); the whole body stays capped by app.BodyLimit.
MAX_TEXT_FIELD_BYTES = 32 * 1024 * 1024
ASPECT_RATIOS = {  # about one megapixel each, sides multiples of 16
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
}
_FORMATS = {
    "png": ImageFormat.PNG,
    "jpeg": ImageFormat.JPEG,
    "jpg": ImageFormat.JPEG,
    "webp": ImageFormat.WEBP,
}


class ImageRequest(BaseModel):
    """Body of /v1/images/generations; the same fields as multipart text fields on /v1/images/edits."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int | None = Field(None, ge=1, le=4, description="number of images; seeds seed, seed+1, ...")
    num_images: int | None = Field(None, ge=1, le=4, description="alias of n")
    size: str | None = Field(
        None, description='"WxH" (256-2048 px per side) or "auto"', examples=["1024x768"]
    )
    aspect_ratio: Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"] | None = None
    width: int | None = Field(None, ge=256, le=2048, description="with height; width*height <= 1048576")
    height: int | None = Field(None, ge=256, le=2048, description="with width; width*height <= 1048576")
    num_inference_steps: int | None = Field(None, ge=1, le=12, description="default 4")
    guidance_scale: float | None = Field(None, ge=0, le=8, description="used only by variants with CFG")
    seed: int | None = Field(None, ge=0, le=2**63 - 8)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    output_format: Literal["png", "jpeg", "jpg", "webp"] | None = None
    format: Literal["png", "jpeg", "jpg", "webp"] | None = Field(None, description="alias of output_format")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, default 100")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="default b64_json")
    return_base64: bool | None = None
    max_sequence_length: int | None = Field(
        None, ge=64, le=512, description="prompt tokens (default: the model's)"
    )
    images: list[str] | None = Field(
        None, max_length=4, description="reference images: URLs, data URLs, base64"
    )
    user: str | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3)

    @property
    def image_format(self) -> ImageFormat:
        return _FORMATS[self.output_format or self.format or "png"]

    @property
    def wants_url(self) -> bool:
        return self.response_format == "url" and not self.return_base64


def parse_fields(fields: dict[str, Any]) -> ImageRequest:
    """Validate request fields; pydantic's errors become InvalidInput naming the field."""
    try:
        return ImageRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise InvalidInput(f"{param}: {error['msg']}", param=param) from None


def _size(wire: ImageRequest) -> tuple[int | None, int | None]:
    if wire.width is not None or wire.height is not None:
        if wire.width is None or wire.height is None:
            raise InvalidInput("width and height must be given together", param="width")
        if wire.width * wire.height > MAX_AREA:
            raise InvalidInput(
                f"width*height is {wire.width * wire.height}", param="width", allowed="at most 1048576 pixels"
            )
        return wire.width, wire.height
    if wire.size and wire.size != "auto":
        try:
            width, height = (int(part) for part in wire.size.lower().split("x"))
        except ValueError:
            raise InvalidInput(
                f"size {wire.size!r} is not WIDTHxHEIGHT", param="size", allowed='"1024x768" or "auto"'
            ) from None
        if not (256 <= width <= 2048 and 256 <= height <= 2048):
            raise InvalidInput(
                f"size {wire.size} is out of range", param="size", allowed="256-2048 px per side"
            )
        return width, height
    if wire.aspect_ratio:
        return ASPECT_RATIOS[wire.aspect_ratio]
    return None, None  # auto: the first reference's size, else the variant's default (1024x1024 for klein)


def to_request(wire: ImageRequest, references: list[Any], spec_distilled: bool) -> GenerateRequest:
    """The internal request for validated wire fields and decoded reference images."""
    if not wire.prompt.strip():
        raise InvalidInput("prompt is empty", param="prompt", allowed="1-32000 characters")
    if len(references) > 4:
        raise InvalidInput(f"{len(references)} reference images", param="image", allowed="at most 4")
    if wire.n is not None and wire.num_images is not None and wire.n != wire.num_images:
        raise InvalidInput("n and num_images disagree", param="n")
    width, height = _size(wire)
    return GenerateRequest(
        prompt=wire.prompt,
        width=width,
        height=height,
        steps=wire.num_inference_steps,
        guidance=None if spec_distilled else wire.guidance_scale,
        seed=wire.seed,
        num_images=wire.n or wire.num_images or 1,
        reference_images=tuple(references),
        negative_prompt=wire.negative_prompt or "",
        max_sequence_length=wire.max_sequence_length,
        output_format=wire.image_format,
        output_quality=DEFAULT_COMPRESSION if wire.output_compression is None else wire.output_compression,
    )


def usage(completed: Completed, request: GenerateRequest) -> dict[str, Any]:
    """OpenAI-shaped usage in the model's own tokens (prompt positions, reference and output latent tokens),
    plus kleinserve's metering (tiles, megapixels, steps, engine seconds)."""
    text = completed.job.params["max_sequence_length"]
    image = completed.reference_tokens
    output = completed.output_tokens
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": text + image + output,
        **(completed.job.usage or {}),
    }


def render_error(exc: KleinError) -> Response:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    body = {
        "error": {
            "message": exc.message,
            "type": kind,
            "param": getattr(exc, "param", None),
            "code": exc.code,
        }
    }
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
    return service.JSONBody(body, status_code=exc.status, headers=headers)


async def _form_fields(request: Request) -> tuple[dict[str, Any], list[Any]]:
    """Text fields and decoded `image` / `image[]` files of a multipart edit request."""
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise InvalidInput(
            "expected a multipart/form-data body", allowed="multipart/form-data with image files"
        )
    # As a context manager so that the uploads' spooled temporary files are closed, on errors too.
    async with request.form(max_files=16, max_fields=64, max_part_size=MAX_TEXT_FIELD_BYTES) as form:
        if "mask" in form:
            raise InvalidInput("masks are not supported yet", param="mask", allowed="edits without a mask")
        files = [f for key in ("image", "image[]") for f in form.getlist(key)]
        if not files:
            raise InvalidInput("no image given", param="image", allowed="1-4 files as image or image[]")
        if len(files) > 4:
            raise InvalidInput(f"{len(files)} images given", param="image", allowed="at most 4")
        images = []
        for index, upload in enumerate(files):
            if not isinstance(upload, UploadFile):
                raise InvalidInput("image must be a file upload", param="image")
            images.append(await asyncio.to_thread(decode_image, await upload.read(), f"image[{index}]"))
        fields: dict[str, Any] = {
            key: value for key, value in form.multi_items() if not isinstance(value, UploadFile)
        }
        references = [text for key in ("images", "images[]") for text in form.getlist(key)]
        fields.pop("images[]", None)
        if references:  # repeated text fields: every one is a reference, not only the last
            fields["images"] = references
        return fields, images


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["OpenAI Images"])

    async def run(
        http_request: Request, owner: str, wire: ImageRequest, files: list[Any], kind: str
    ) -> Response:
        model = services.check_model(wire.model)
        references = files + [
            await services.fetcher.image(text, f"images[{i}]") for i, text in enumerate(wire.images or [])
        ]
        request = to_request(wire, references, services.spec.distilled)
        if wire.stream:
            # Checked here as well as on submit: once streaming starts, errors can only be events. Other
            # requests are checked once, by the worker (resolving resizes up to four references).
            resolved = await asyncio.to_thread(services.worker.pipeline.resolve, request)
            partial_at = service.partial_steps(resolved.steps, wire.partial_images or 0)
            events = _stream(services, http_request, owner, request, partial_at, kind)
            return StreamingResponse(events, media_type="text/event-stream")
        completed = await service.generate(services, http_request, owner, request)
        base_url = str(http_request.base_url).rstrip("/")
        return service.JSONBody(_body(services, base_url, wire, request, completed, model))

    @router.post("/v1/images/generations", summary="Create images from a prompt (and optional references)")
    async def create_image(http_request: Request) -> Response:
        owner = service.caller(services, http_request)  # before reading the body
        wire = parse_fields(await service.read_json_object(http_request, require_json_type=True))
        return await run(http_request, owner, wire, [], "image_generation")

    @router.post("/v1/images/edits", summary="Edit 1-4 images (multipart)")
    async def create_image_edit(http_request: Request) -> Response:
        owner = service.caller(services, http_request)  # before reading and decoding uploads
        fields, images = await _form_fields(http_request)
        return await run(http_request, owner, parse_fields(fields), images, "image_edit")

    @router.get("/v1/models")
    async def list_models(http_request: Request) -> dict[str, Any]:
        service.caller(services, http_request)
        return {"object": "list", "data": [_card(services, model) for model in services.model_ids]}

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, http_request: Request) -> dict[str, Any]:
        service.caller(services, http_request)
        services.check_model(model_id)
        return {**_card(services, model_id), "parameters": parameter_schema(services)}

    return router


def _body(
    services: Services,
    base_url: str,
    wire: ImageRequest,
    request: GenerateRequest,
    completed: Completed,
    model: str,
) -> dict[str, Any]:
    data = []
    for name, payload, seed in zip(completed.media_names, completed.images, completed.seeds, strict=True):
        if wire.wants_url:
            item: dict[str, Any] = {"url": base_url + services.media.signed_path(name)}
        else:
            item = {"b64_json": base64_text(payload)}
        data.append({**item, "revised_prompt": None, "seed": seed})
    return {
        "created": int(time.time()),
        "model": model,
        "id": completed.job.id,
        "data": data,
        "output_format": request.output_format.value,
        "size": f"{completed.width}x{completed.height}",
        "usage": usage(completed, request),
    }


async def _stream(
    services: Services,
    http_request: Request,
    owner: str,
    request: GenerateRequest,
    partial_at: list[int],
    kind: str,
) -> AsyncIterator[str]:
    """SSE: `<kind>.partial_image` for the chosen steps, then `<kind>.completed` per image."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, list[Any]]] = asyncio.Queue()
    fmt = request.output_format

    def on_step(progress: Progress) -> None:
        if progress.step in partial_at:
            previews = progress.preview()  # decoded on the engine thread, for the chosen steps only
            loop.call_soon_threadsafe(events.put_nowait, (progress.step, previews))

    task = asyncio.ensure_future(service.generate(services, http_request, owner, request, on_step))
    partial_index = 0
    try:
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            _, previews = getter.result()
            payload = (await service.encode_all(previews[:1], fmt, request.output_quality))[0]
            size = f"{previews[0].width}x{previews[0].height}"
            yield _event(
                f"{kind}.partial_image",
                {
                    "b64_json": base64_text(payload),
                    "partial_image_index": partial_index,
                    "created_at": int(time.time()),
                    "output_format": fmt.value,
                    "size": size,
                    "background": "opaque",
                    "quality": "auto",
                },
            )
            partial_index += 1
        completed = task.result()
    except KleinError as exc:
        yield _event(
            "error", {"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.code}}
        )
        return
    finally:
        if not task.done():
            task.cancel()
    for payload, seed in zip(completed.images, completed.seeds, strict=True):
        yield _event(
            f"{kind}.completed",
            {
                "b64_json": base64_text(payload),
                "created_at": int(time.time()),
                "output_format": fmt.value,
                "size": f"{completed.width}x{completed.height}",
                "background": "opaque",
                "quality": "auto",
                "seed": seed,
                "usage": usage(completed, request),
            },
        )


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json_bytes({'type': name, **data}).decode()}\n\n"


def _card(services: Services, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "black-forest-labs",
        "variant": services.spec.name,
    }


def parameter_schema(services: Services) -> dict[str, Any]:
    """JSON Schema of the accepted parameters with this variant's defaults filled in."""
    schema = ImageRequest.model_json_schema()
    properties = schema["properties"]
    properties["num_inference_steps"]["default"] = services.spec.default_steps
    properties["guidance_scale"]["default"] = services.spec.default_guidance
    if services.spec.guidance_fixed:
        # JSON Schema's word for "the server decides, a value sent is ignored" (to_request drops it); the
        # playground shows steps and guidance only for variants without it.
        properties["guidance_scale"]["readOnly"] = True
    properties["n"]["default"] = 1
    properties["size"]["default"] = f"{services.spec.default_side}x{services.spec.default_side}"
    properties["output_format"]["default"] = "png"
    properties["output_compression"]["default"] = DEFAULT_COMPRESSION
    properties["response_format"]["default"] = "b64_json"
    return schema
