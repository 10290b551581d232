"""OpenAI Images API: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart), GET /v1/models.

Fields follow OpenAI's Images API plus the klein extensions hosted klein endpoints accept (wire-formats.md
section 3); the pydantic model in openai_protocol.py is the contract and `GET /v1/models/{id}` publishes it
as JSON Schema. Unknown fields are ignored. Sizes that are not multiples of 16 are rounded down and the
response's `size` says what was made. `stream: true` answers Server-Sent Events with `partial_images`
previews.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from starlette.datastructures import UploadFile

from kleinserve.api import openapi, service
from kleinserve.api._dialect import (
    DialectRoute,
    check_area,
    check_prompt,
    error_body,
    error_headers,
    parse_size,
)
from kleinserve.api.openai_protocol import (
    ASPECT_RATIOS,
    DEFAULT_COMPRESSION,
    MAX_AREA,
    MAX_TEXT_FIELD_BYTES,
    ImageRequest,
    parse_fields,
)
from kleinserve.api.service import Completed, Services
from kleinserve.engine.protocol import SIZE_MULTIPLE
from kleinserve.errors import InvalidInput, KleinError
from kleinserve.jobs.intake import Pending
from kleinserve.media import decode_image
from kleinserve.types import GenerateRequest, LoraChoice, Progress, StepCallback, base64_text, json_bytes


def _size(wire: ImageRequest) -> tuple[int | None, int | None, str]:
    """(width, height) in pixels asked for, None for "auto", and the field that asked."""
    if wire.width is not None or wire.height is not None:
        if wire.width is None or wire.height is None:
            raise InvalidInput("width and height must be given together", param="width")
        return *check_area(wire.width, wire.height, MAX_AREA, "width"), "width"
    if wire.size and wire.size != "auto":
        return *parse_size(wire.size, MAX_AREA), "size"
    if wire.aspect_ratio:
        return *ASPECT_RATIOS[wire.aspect_ratio], "aspect_ratio"
    return None, None, "size"  # auto: the first reference's size, else the variant's default (1024x1024)


def to_request(
    wire: ImageRequest,
    references: list[Any],
    loras: tuple[LoraChoice, ...] = (),
    mask: Image.Image | None = None,
) -> GenerateRequest:
    """The internal request for validated wire fields, decoded reference images (the first is the one a
    `mask` or `wire.strength` edits), the adapters of `wire.loras` (AdapterSource.choices) and the mask in
    kleinserve's convention. `num_inference_steps` is honoured on every variant; a variant with fixed
    guidance ignores `guidance_scale` (ModelSpec)."""
    check_prompt(wire.prompt)
    if len(references) > 4:
        raise InvalidInput(f"{len(references)} reference images", param="image", allowed="at most 4")
    if wire.n is not None and wire.num_images is not None and wire.n != wire.num_images:
        raise InvalidInput("n and num_images disagree", param="n")
    width, height, size_param = _size(wire)
    editing = mask is not None or wire.strength is not None
    width, height = service.requested_size(references, width, height, size_param, editing)
    return GenerateRequest(
        prompt=wire.prompt,
        width=width,
        height=height,
        steps=wire.num_inference_steps,
        guidance=wire.guidance_scale,
        seed=wire.seed,
        num_images=wire.n or wire.num_images or 1,
        reference_images=tuple(references),
        negative_prompt=wire.negative_prompt or "",
        max_sequence_length=wire.max_sequence_length,
        output_format=wire.image_format,
        output_quality=DEFAULT_COMPRESSION if wire.output_compression is None else wire.output_compression,
        loras=loras,
        mask=mask,
        strength=wire.strength,
    )


def usage(completed: Completed, request: GenerateRequest) -> dict[str, Any]:
    """OpenAI-shaped usage in the model's own tokens (the prompt's tokens as the text encoder reads them,
    chat template included and padding not; reference and output latent tokens), plus kleinserve's metering
    (tiles, megapixels, steps, engine seconds)."""
    result = completed.result
    text = result.prompt_tokens
    image = sum(_latent_tokens(w, h) for w, h in completed.job.params.reference_sizes)
    output = _latent_tokens(result.width, result.height) * len(result.images)
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": text + image + output,
        **service.usage_fields(completed.job.usage),
    }


def _latent_tokens(width: int, height: int) -> int:
    """The model's tokens for an image of `width` x `height` pixels: one per SIZE_MULTIPLE square."""
    return (width // SIZE_MULTIPLE) * (height // SIZE_MULTIPLE)


def warnings(wire: ImageRequest) -> list[dict[str, str]]:
    """Requested fields the answer does not honour, said in its `warnings` (not an OpenAI field; the openai
    SDK keeps it as an extra). A diffusion model makes no alpha channel: `background: "transparent"` gets an
    opaque image, as the answer's `background` says."""
    if wire.background == "transparent":
        message = "transparent backgrounds are not supported: the image is opaque"
        return [{"type": "unsupported", "param": "background", "message": message}]
    return []


def error_type(exc: KleinError) -> str:
    """OpenAI's error `type`: the caller's fault (4xx) or the server's (5xx)."""
    return "invalid_request_error" if exc.status < 500 else "server_error"


def render_error(exc: KleinError) -> Response:
    """OpenAI's error answer; a stream that has started sends the same body as its `error` event."""
    return service.JSONBody(
        error_body(exc, error_type(exc)), status_code=exc.status, headers=error_headers(exc)
    )


class OpenAIRoute(DialectRoute):
    """OpenAI's routes, and kleinserve's own job API, which answers in the same error body."""

    def render_error(self, exc: KleinError) -> Response:
        return render_error(exc)


async def _form_fields(request: Request) -> tuple[dict[str, Any], list[Any], Image.Image | None]:
    """Text fields, decoded `image` / `image[]` files and the decoded `mask` file (None: no file; a `mask`
    text field, a URL or base64, stays a field) of a multipart edit request."""
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise InvalidInput(
            "expected a multipart/form-data body", allowed="multipart/form-data with image files"
        )
    # As a context manager so that the uploads' spooled temporary files are closed, on errors too.
    async with service.read_form(
        request, max_files=16, max_fields=64, max_part_size=MAX_TEXT_FIELD_BYTES
    ) as form:
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
        masks = form.getlist("mask")
        if len(masks) > 1:
            raise InvalidInput(f"{len(masks)} masks given", param="mask", allowed="one mask")
        mask = None
        if masks and isinstance(masks[0], UploadFile):
            mask = await asyncio.to_thread(decode_image, await masks[0].read(), "mask")
        fields: dict[str, Any] = {
            key: value for key, value in form.multi_items() if not isinstance(value, UploadFile)
        }
        references = [text for key in ("images", "images[]") for text in form.getlist(key)]
        fields.pop("images[]", None)
        if references:  # repeated text fields: every one is a reference, not only the last
            fields["images"] = references
        return fields, images, mask


async def _mask(services: Services, wire: ImageRequest, upload: Image.Image | None) -> Image.Image | None:
    """The request's mask in kleinserve's convention (service.transparent_mask): the uploaded file, else the
    `mask` field fetched like a reference; None without either."""
    source = upload
    if source is None and wire.mask:
        source = await services.fetcher.image(wire.mask, "mask")
    return None if source is None else await asyncio.to_thread(service.transparent_mask, source, "mask")


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["OpenAI Images"], route_class=OpenAIRoute)

    async def run(
        http_request: Request,
        owner: str,
        wire: ImageRequest,
        files: list[Any],
        kind: str,
        mask_upload: Image.Image | None = None,
    ) -> Response:
        model = services.check_model(wire.model)
        # After the files: the image edited (JSON's `image`), then the references given as text.
        texts = [("image", wire.image)] if wire.image else []
        texts += [(f"images[{i}]", text) for i, text in enumerate(wire.images or [])]
        references = files + [await services.fetcher.image(text, param) for param, text in texts]
        mask = await _mask(services, wire, mask_upload)
        request = to_request(wire, references, await services.loras.choices(wire.loras), mask)
        if wire.stream:
            # Submitted before the stream starts, so that every refusal up to acceptance (bad values, a full
            # queue) is an HTTP error in OpenAI's body; once the stream has started, errors are events.
            previews: asyncio.Queue[list[Image.Image]] = asyncio.Queue()
            on_step = _send_previews(previews, wire.partial_images or 0)
            pending = await service.submit(services, owner, request, on_step)
            events = _stream(services, http_request, pending, request, previews, kind)
            return StreamingResponse(events, media_type="text/event-stream")
        completed = await service.generate(services, http_request, owner, request)
        base_url = services.origin(http_request)
        return service.JSONBody(_body(services, base_url, wire, request, completed, model))

    @router.post(
        "/v1/images/generations",
        summary="Create images from a prompt (and optional references)",
        openapi_extra=openapi.json_body(ImageRequest),
        responses=openapi.errors(openapi.ErrorBody, (400, 401, 404, 413, 429, 503)),
    )
    async def create_image(http_request: Request) -> Response:
        owner = service.caller(services, http_request)  # before reading the body
        wire = parse_fields(await service.read_json_object(http_request, require_json_type=True))
        return await run(http_request, owner, wire, [], "image_generation")

    @router.post(
        "/v1/images/edits",
        summary="Edit 1-4 images (multipart)",
        openapi_extra=openapi.multipart_body(
            ImageRequest, "ImageEditRequest", {"image": "1-4 images to edit (also taken as image[])"}
        ),
        responses=openapi.errors(openapi.ErrorBody, (400, 401, 404, 413, 429, 503)),
    )
    async def create_image_edit(http_request: Request) -> Response:
        owner = service.caller(services, http_request)  # before reading and decoding uploads
        fields, images, mask = await _form_fields(http_request)
        return await run(http_request, owner, parse_fields(fields), images, "image_edit", mask)

    @router.get("/v1/models", responses=openapi.errors(openapi.ErrorBody, (401,)))
    async def list_models(http_request: Request) -> dict[str, Any]:
        service.caller(services, http_request)
        return {"object": "list", "data": [_card(services, model) for model in services.model_ids]}

    @router.get("/v1/models/{model_id:path}", responses=openapi.errors(openapi.ErrorBody, (401, 404)))
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
    result = completed.result
    for image, payload in zip(result.images, completed.images, strict=True):
        if wire.wants_url:
            item: dict[str, Any] = {"url": base_url + services.media.signed_path(image.media)}
        else:
            item = {"b64_json": base64_text(payload)}
        data.append({**item, "revised_prompt": None, "seed": image.seed})
    return {
        "created": int(time.time()),
        "model": model,
        "id": completed.job.id,
        "data": data,
        "background": "opaque",
        "output_format": request.output_format.value,
        "size": f"{result.width}x{result.height}",
        "usage": usage(completed, request),
        **({"warnings": notes} if (notes := warnings(wire)) else {}),
    }


def _send_previews(previews: asyncio.Queue[list[Image.Image]], partial_images: int) -> StepCallback:
    """The step callback that decodes previews at the steps `partial_images` asks for (service.partial_steps
    of the job's own step count) and hands them to `previews` on the calling event loop."""
    loop = asyncio.get_running_loop()

    def on_step(progress: Progress) -> None:
        if progress.step in service.partial_steps(progress.total_steps, partial_images):
            decoded = progress.preview()  # on the engine thread, for the chosen steps only
            # Empty when the step came without one (Progress.preview's default; across processes, a preview
            # this API process could not read from the object store): that partial image is skipped.
            if decoded:
                loop.call_soon_threadsafe(previews.put_nowait, decoded)

    return on_step


async def _stream(
    services: Services,
    http_request: Request,
    pending: Pending,
    request: GenerateRequest,
    previews: asyncio.Queue[list[Image.Image]],
    kind: str,
) -> AsyncIterator[str]:
    """SSE for a submitted job: `<kind>.partial_image` per item of `previews`, then `<kind>.completed` per
    image, or an `error` event if the job does not succeed."""
    fmt = request.output_format
    task = asyncio.ensure_future(service.finish(services, http_request, pending))
    partial_index = 0
    try:
        while not task.done() or not previews.empty():
            getter = asyncio.ensure_future(previews.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            images = getter.result()
            payload = (await service.encode_all(images[:1], fmt, request.output_quality))[0]
            size = f"{images[0].width}x{images[0].height}"
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
        yield _event("error", error_body(exc, error_type(exc)))
        return
    finally:
        if not task.done():
            task.cancel()
    result = completed.result
    for payload, seed in zip(completed.images, result.seeds, strict=True):
        yield _event(
            f"{kind}.completed",
            {
                "b64_json": base64_text(payload),
                "created_at": int(time.time()),
                "output_format": fmt.value,
                "size": f"{result.width}x{result.height}",
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
        # JSON Schema's word for "the server decides, a value sent is ignored" (resolve_request ignores it);
        # the playground shows steps and guidance only for variants without it.
        properties["guidance_scale"]["readOnly"] = True
    properties["n"]["default"] = 1
    properties["size"]["default"] = f"{services.spec.default_side}x{services.spec.default_side}"
    properties["output_format"]["default"] = "png"
    properties["output_compression"]["default"] = DEFAULT_COMPRESSION
    properties["response_format"]["default"] = "b64_json"
    return schema
