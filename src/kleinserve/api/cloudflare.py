"""Cloudflare Workers AI: POST /client/v4/accounts/{account_id}/ai/run/@cf/black-forest-labs/flux-2-klein-4b
(and /ai/run/{model}), multipart/form-data, answered in Cloudflare's v4 envelope.

Fields: `prompt` (a JSON object given as the prompt is passed through as text), `width`/`height` (256-1920,
default 1024x768, or that 4:3 at a smaller model's own side: 256x192 for the toy), `seed`, `guidance`
(variants with CFG only), `steps` (fixed at the variant's default for distilled klein, as on Cloudflare),
`input_image_0` ... `input_image_3`, and kleinserve's `loras` (the JSON text of api/loras.py's array). The
image comes back as base64 PNG.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from kleinserve.api import openapi, service
from kleinserve.api._dialect import MAX_PROMPT_CHARS, DialectRoute, check_prompt, claim_prefix, error_headers
from kleinserve.api.service import Services
from kleinserve.engine.protocol import SIZE_MULTIPLE, ModelSpec
from kleinserve.errors import (
    Cancelled,
    InvalidInput,
    KleinError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnknownModel,
)
from kleinserve.media import decode_base64_image, decode_image
from kleinserve.types import MAX_SEED, GenerateRequest, ImageFormat, LoraChoice, base64_text

DEFAULT_WIDTH, DEFAULT_HEIGHT = 1024, 768
MIN_SIDE, MAX_SIDE = 256, 1920
MAX_STEPS = 50
REFERENCE_FIELDS = tuple(f"input_image_{i}" for i in range(4))


def _int(form: dict[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    text = form.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(
            f"{name} {text!r} is not an integer", param=name, allowed=f"{low}-{high}"
        ) from None
    if not low <= value <= high:
        raise InvalidInput(f"{name} {value} is out of range", param=name, allowed=f"{low}-{high}")
    return value


def default_size(spec: ModelSpec) -> tuple[int, int]:
    """(width, height) in pixels when the form gives none: Cloudflare's 1024x768, or for a model whose own
    default side is smaller (the toy: 256, trained at 128-256 px, smears at 1024) the same 4:3 with that side
    as the width, the height rounded down to a multiple of 16 (256x192). MIN_SIDE bounds what clients send,
    not this."""
    width = min(DEFAULT_WIDTH, spec.default_side)
    height = width * DEFAULT_HEIGHT // DEFAULT_WIDTH
    return width, height - height % SIZE_MULTIPLE


class WorkersAIForm(BaseModel):
    """The multipart fields as `to_request` reads them, for /openapi.json (the route reads the form)."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(
        None, ge=MIN_SIDE, le=MAX_SIDE, description="default 1024 (4:3 at a small model's side)"
    )
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="default 768")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="variants with CFG only; distilled: fixed"
    )
    guidance: float | None = Field(None, description="variants with CFG only")
    input_image_0: bytes | None = Field(None, description="reference image: a file, or base64 text")
    input_image_1: bytes | None = None
    input_image_2: bytes | None = None
    input_image_3: bytes | None = None
    loras: str | None = Field(None, description='LoRA adapters, JSON: [{"name" | "url", "scale"?}]')


def to_request(
    form: dict[str, str], references: list, spec: ModelSpec, loras: tuple[LoraChoice, ...] = ()
) -> GenerateRequest:
    """The internal request for the form's text fields, its decoded references and the adapters of its
    `loras` field (AdapterSource.choices)."""
    prompt = check_prompt(form.get("prompt"))
    guidance = form.get("guidance")
    try:
        guidance_value = float(guidance) if guidance not in (None, "") else None
    except ValueError:
        raise InvalidInput(f"guidance {guidance!r} is not a number", param="guidance") from None
    width, height = default_size(spec)
    return GenerateRequest(
        prompt=prompt,
        width=_int(form, "width", width, MIN_SIDE, MAX_SIDE),
        height=_int(form, "height", height, MIN_SIDE, MAX_SIDE),
        seed=_int(form, "seed", None, 0, MAX_SEED),
        steps=_int(form, "steps", None, 1, MAX_STEPS),
        guidance=guidance_value,
        reference_images=tuple(references),
        output_format=ImageFormat.PNG,
        fixed_by_variant=True,  # as on Cloudflare: distilled klein's steps are its own
        loras=loras,
    )


def render_error(exc: KleinError) -> Response:
    """Cloudflare's envelope and codes: 5006 bad input, 5007 no such model, 10000 auth, 3040 busy,
    3006 too large, 3008 aborted, 7000 no route (the v4 API's "No route for that URI")."""
    code, status = 5006, 400
    if isinstance(exc, UnknownModel):
        code, status = 5007, 400
    elif isinstance(exc, Unauthorized):
        code, status = 10000, 401
    elif isinstance(exc, Overloaded):
        code, status = 3040, exc.status
    elif isinstance(exc, PayloadTooLarge):
        code, status = 3006, 413
    elif isinstance(exc, InvalidInput):
        code, status = 5006, 400  # includes the framework's own 400s, e.g. a malformed multipart body
    elif isinstance(exc, NotFound | MethodNotAllowed):
        code, status = 7000, exc.status
    elif isinstance(exc, Cancelled):
        code, status = 3008, exc.status
    else:
        code, status = (3007 if exc.status < 500 else 5000), exc.status
    message = f"AiError: Bad input: {exc.message}" if code == 5006 else exc.message
    body = {"success": False, "errors": [{"code": code, "message": message}], "result": {}, "messages": []}
    return service.JSONBody(body, status_code=status, headers=error_headers(exc))


class WorkersAIRoute(DialectRoute):
    def render_error(self, exc: KleinError) -> Response:
        return render_error(exc)


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["Cloudflare Workers AI"], route_class=WorkersAIRoute)

    async def run(model: str, http_request: Request) -> dict:
        owner = service.caller(services, http_request)
        services.check_model(model)
        if "multipart/form-data" not in http_request.headers.get("content-type", ""):
            raise InvalidInput(
                "required properties at '/' are 'multipart'", allowed="multipart/form-data fields"
            )
        # As a context manager so that uploaded files (spooled to temporary files) are closed afterwards.
        async with service.read_form(http_request, max_files=8, max_fields=32) as form:
            fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
            extra = sorted(k for k in form if k.startswith("input_image_") and k not in REFERENCE_FIELDS)
            if extra:
                raise InvalidInput(f"{extra[0]} given", param=extra[0], allowed="at most 4: input_image_0..3")
            references = []
            for name in REFERENCE_FIELDS:
                upload = form.get(name)
                if upload is None:
                    continue
                if isinstance(upload, UploadFile):
                    references.append(await asyncio.to_thread(decode_image, await upload.read(), name))
                else:  # base64 text: decoded off the loop too
                    references.append(await asyncio.to_thread(decode_base64_image, upload, name))
        loras = await services.loras.choices(fields.get("loras"))
        request = to_request(fields, references, services.spec, loras)
        completed = await service.generate(services, http_request, owner, request)
        (png,) = completed.images
        return {
            "result": {"image": base64_text(png)},
            "success": True,
            "errors": [],
            "messages": [],
        }

    @router.post(
        "/client/v4/accounts/{account_id}/ai/run/{model:path}",
        summary="Run a model (Workers AI)",
        openapi_extra=openapi.multipart_body(WorkersAIForm),
        responses=openapi.errors(openapi.WorkersAIError, (400, 401, 413, 429, 503)),
    )
    async def run_with_account(account_id: str, model: str, http_request: Request) -> dict:
        return await run(model, http_request)

    @router.post(
        "/ai/run/{model:path}",
        summary="Run a model (Workers AI, no account path)",
        openapi_extra=openapi.multipart_body(WorkersAIForm),
        responses=openapi.errors(openapi.WorkersAIError, (400, 401, 413, 429, 503)),
    )
    async def run_short(model: str, http_request: Request) -> dict:
        return await run(model, http_request)

    claim_prefix(router, "/client/v4/")  # the v4 API's own "No route for that URI" (7000) for the rest
    return router
