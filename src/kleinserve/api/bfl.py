"""Black Forest Labs' async API: POST /v1/flux-2-klein-4b, then poll GET /v1/get_result?id=...

Submit answers at once with `{id, polling_url (absolute), cost, input_mp, output_mp}`; the job runs in the
queue. Polling answers `{id, status: Pending | Ready | Error | Task not found, result, progress}`;
`result.sample` is a signed URL that a plain GET (the BFL clients send their `x-key` along; it is not
needed) turns into the image bytes. `webhook_url` + `webhook_secret` get a POST on completion, signed
`X-BFL-Signature: sha256=<hex HMAC-SHA256 of the raw body>` (this module's WebhookFormat, delivered by
jobs/webhooks.py). Absolute URLs start with the server's `--public-url` when set, else with the origin the
request was made to. Errors use BFL's bodies: 422 `{"detail": [{loc, msg, type}]}`,
429 `{"error": "rate_limit_exceeded", ...}`.

BFL's klein endpoints take no `steps`/`guidance` (the distilled model is fixed at 4 steps, guidance 1.0),
and a distilled variant here ignores them too, as BFL does. The base variants, which BFL does not host, take
them under the names of BFL's FLUX.2 [flex] endpoint, so that a BFL-shaped job (and the playground) can set
them. `loras` (api/loras.py's array) is kleinserve's extension of the body.

Masks and strength are kleinserve's extension too (BFL's klein endpoint has neither): `image_prompt` is the
image edited (a URL or base64, like `input_image`), `mask` what of it to repaint (a URL or base64 image of
its size, BFL's fill convention: white repaints, black keeps), `strength` (0 < s <= 1, default 1.0 with a
mask) how far from it denoising starts. The references are then `image_prompt`, `input_image`,
`input_image_2` ..., at most 4 in all; the output has the size of `image_prompt`. Without `image_prompt`,
`input_image` is the image edited (BFL's fill endpoint sends `image` + `mask`, and the AI SDK's BFL provider
sends `input_image` + `mask`). Without a mask or strength, `image_prompt` is only the first reference.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from kleinserve.api import openapi, service
from kleinserve.api._dialect import MAX_PROMPT_CHARS, DialectRoute, check_prompt, error_headers, parse_model
from kleinserve.api.service import Services
from kleinserve.errors import InvalidInput, KleinError, NotFound, Overloaded
from kleinserve.jobs.record import JobParams
from kleinserve.jobs.store import Job, JobStatus
from kleinserve.jobs.webhooks import FORMAT_KEY, WebhookFormat
from kleinserve.types import MAX_SEED, GenerateRequest, ImageFormat, LoraChoice

_STATUS = {
    JobStatus.QUEUED: "Pending",
    JobStatus.RUNNING: "Pending",
    JobStatus.SUCCEEDED: "Ready",
    JobStatus.FAILED: "Error",
    JobStatus.CANCELLED: "Error",
}
# BFL's klein-4b price (credits, 1 credit = 1 US cent): first output megapixel, then per further megapixel in
# or out (wire-formats.md section 4.7).
FIRST_MP_CREDITS = 1.4
MP_CREDITS = 0.1
WEBHOOK_FORMAT = "bfl"  # the name this module's WebhookFormat is registered and recorded under
# Job.extra: the origin the job was submitted to, for its webhook's URLs when the server has no public_url.
_ORIGIN_KEY = "base_url"


class FluxKleinInputs(BaseModel):
    """BFL's Flux2KleinInputs plus [flex]'s steps/guidance (base variants only) and kleinserve's `loras`;
    unknown fields (aspect_ratio, raw ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    input_image: str | None = None
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    width: int | None = Field(None, ge=0, le=2048, description="multiple of 16, min 64; 0 or absent = auto")
    height: int | None = Field(None, ge=0, le=2048, description="multiple of 16, min 64; 0 or absent = auto")
    steps: int | None = Field(None, ge=1, le=50, description="base variants only; distilled: ignored")
    guidance: float | None = Field(None, ge=0, le=10, description="base variants only; distilled: ignored")
    safety_tolerance: int | None = Field(None, ge=0, le=6, description="accepted, not applied")
    output_format: Literal["jpeg", "png", "webp"] | None = "jpeg"
    webhook_url: str | None = Field(None, min_length=1, max_length=2083)
    webhook_secret: str | None = None
    loras: list[Any] | None = Field(None, description='LoRA adapters: [{"name" | "url", "scale"?}]')
    image_prompt: str | None = Field(None, description="kleinserve: the image a mask or strength edits")
    mask: str | None = Field(None, description="kleinserve: white repaints; the size of image_prompt")
    strength: float | None = Field(None, gt=0, le=1, description="kleinserve: default 1.0 with a mask")


def _side(value: int | None, name: str) -> int | None:
    if not value:
        return None
    if value < 64:
        raise InvalidInput(f"{name} {value} is below 64", param=name, allowed="a multiple of 16, at least 64")
    return value


def _check_webhook_url(url: str | None) -> None:
    """An http(s) URL with a host, refused at submit rather than failing at every delivery attempt.
    (Whether its host is public is checked at delivery, where the address is resolved.)"""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"webhook_url {url!r} is not an http(s) URL", param="webhook_url")


_INPUT_IMAGES = ("input_image", "input_image_2", "input_image_3", "input_image_4")


def _check_edit(wire: FluxKleinInputs) -> None:
    """A mask or strength edits `image_prompt` (else `input_image`), which must be given; 4 images at most
    in all."""
    for name in ("mask", "strength"):
        if getattr(wire, name) is not None and not (wire.image_prompt or wire.input_image):
            raise InvalidInput(
                f"{name} without image_prompt or input_image, the image it edits",
                param=name,
                allowed="with image_prompt (or input_image)",
            )
    given = [name for name in ("image_prompt", *_INPUT_IMAGES) if getattr(wire, name)]
    if len(given) > 4:
        raise InvalidInput(
            f"{len(given)} images given ({', '.join(given)})",
            param=given[-1],
            allowed="at most 4, image_prompt included",
        )


def to_request(
    wire: FluxKleinInputs,
    references: list[Any],
    loras: tuple[LoraChoice, ...] = (),
    mask: Image.Image | None = None,
) -> GenerateRequest:
    """The internal request, with the adapters of `wire.loras` (AdapterSource.choices) and `wire.mask` in
    kleinserve's convention (`mask`); `steps`/`guidance` apply only where the loaded variant leaves them
    free, as on BFL's klein endpoint (`fixed_by_variant`)."""
    _check_webhook_url(wire.webhook_url)
    check_prompt(wire.prompt)
    width, height = _side(wire.width, "width"), _side(wire.height, "height")
    editing = mask is not None or wire.strength is not None
    param = "width" if width else "height"
    width, height = service.requested_size(references, width, height, param, editing)
    return GenerateRequest(
        prompt=wire.prompt,
        width=width,
        height=height,
        steps=wire.steps,
        guidance=wire.guidance,
        seed=wire.seed,
        reference_images=tuple(references),
        output_format=ImageFormat.parse(wire.output_format or "jpeg"),
        fixed_by_variant=True,
        loras=loras,
        mask=mask,
        strength=wire.strength,
    )


def render_error(exc: KleinError) -> Response:
    """BFL's bodies: 422 `{"detail": [{loc, msg, type}]}` for bad input, 429 `{"error": "rate_limit_exceeded",
    ...}`, else `{"detail": message}` at the error's status."""
    headers = error_headers(exc)
    if isinstance(exc, Overloaded) and exc.status == 429:
        body: dict[str, Any] = {
            "error": "rate_limit_exceeded",
            "message": exc.message,
            "retry_after": exc.retry_after,
        }
        return service.JSONBody(body, status_code=429, headers=headers)
    if isinstance(exc, InvalidInput) and exc.status == 400:
        location = ["body", exc.param] if exc.param else ["body"]
        body = {"detail": [{"loc": location, "msg": exc.message, "type": "value_error"}]}
        return service.JSONBody(body, status_code=422)
    return service.JSONBody({"detail": exc.message}, status_code=exc.status, headers=headers)


class BFLRoute(DialectRoute):
    def render_error(self, exc: KleinError) -> Response:
        return render_error(exc)


def planned_usage(params: JobParams) -> dict[str, float]:
    """Megapixels in and out of a job's `params`, known at submit time (BFL answers them before the job
    runs): `{"input_mp", "output_mp"}`, rounded to 0.01."""
    return {
        "input_mp": round(sum(w * h for w, h in params.reference_sizes) / 1e6, 2),
        "output_mp": round(params.num_images * params.width * params.height / 1e6, 2),
    }


def cost(input_mp: float, output_mp: float) -> float:
    """BFL's klein-4b price in credits for the given megapixels, rounded to 0.001."""
    return round(FIRST_MP_CREDITS + max(0.0, output_mp - 1) * MP_CREDITS + input_mp * MP_CREDITS, 3)


@dataclass(frozen=True)
class Outcome:
    """A job as BFL reports it, by polling and by webhook alike: its status word, its `result` (a succeeded
    job's first image: BFL makes one) and, when it did not succeed, `kind` (the job's status, or "expired")
    and why."""

    status: str
    result: dict[str, Any] | None = None
    kind: str | None = None
    error: str | None = None


def outcome(services: Services, job: Job, base_url: str) -> Outcome:
    """`job`'s Outcome, its URLs starting with `base_url`. Past the media lifetime a succeeded job's images
    are deleted: Error, "the result expired", rather than a link to a file that is gone."""
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        return Outcome(_STATUS[job.status], kind=job.status.value, error=job.error)
    if services.media.expired(job.finished):
        ttl = services.media.ttl_s
        error = f"the result expired: images are kept {ttl} s after the job ends"
        return Outcome("Error", kind="expired", error=error)
    first = job.result.images[0]
    result = {
        "sample": base_url + services.media.signed_path(first.media),
        "seed": first.seed,
        "prompt": job.params.prompt,
        "start_time": job.started,
        "end_time": job.finished,
        "duration": round((job.finished or 0) - (job.started or 0), 3),
    }
    return Outcome(_STATUS[job.status], result)


def webhook_body(services: Services, job: Job) -> dict[str, Any]:
    """What BFL posts to a webhook_url: Ready with the result, or Error with a message. Its URLs start with
    the server's public_url, else with the origin the job was submitted to."""
    told = outcome(services, job, services.public_url or job.extra.get(_ORIGIN_KEY, ""))
    base = {"id": job.id, "status": told.status, "timestamp": int(time.time())}
    if told.result is not None:
        return {**base, "result": told.result}
    return {**base, "error": told.kind, "message": told.error or told.kind}


def sign_webhook(body: bytes, secret: str) -> dict[str, str]:
    """BFL's signature header: `X-BFL-Signature: sha256=<hex HMAC-SHA256 of the raw body with secret>`."""
    return {"X-BFL-Signature": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


def webhook_format(services: Services) -> WebhookFormat:
    """BFL's webhooks, to register under WEBHOOK_FORMAT with the webhook sender."""
    return WebhookFormat(render=functools.partial(webhook_body, services), sign=sign_webhook)


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["Black Forest Labs"], route_class=BFLRoute)

    @router.post(
        "/v1/{model}",
        summary="Submit a FLUX.2 [klein] job (BFL API)",
        openapi_extra=openapi.json_body(FluxKleinInputs),
        responses=openapi.errors(
            openapi.BFLError,
            (401, 404, 413, 503),
            {422: openapi.BFLValidationError, 429: openapi.BFLRateLimit},
        ),
    )
    async def submit(model: str, http_request: Request) -> dict[str, Any]:
        owner = service.caller(services, http_request)
        services.check_model(model)
        wire = parse_model(FluxKleinInputs, await service.read_json_object(http_request))
        _check_edit(wire)  # before any image is fetched
        fields = ("image_prompt", *_INPUT_IMAGES)
        references = [
            await services.fetcher.image(value, name) for name in fields if (value := getattr(wire, name))
        ]
        mask = None
        if wire.mask is not None:
            given = await services.fetcher.image(wire.mask, "mask")
            mask = await asyncio.to_thread(service.white_mask, given, "mask")
        request = to_request(wire, references, await services.loras.choices(wire.loras), mask)
        job = await asyncio.to_thread(
            functools.partial(
                services.jobs.submit,
                request,
                owner,
                webhook_url=wire.webhook_url,
                webhook_secret=wire.webhook_secret,
                # The request's own origin even with a public_url: a restart without it still has one.
                extra={FORMAT_KEY: WEBHOOK_FORMAT, _ORIGIN_KEY: str(http_request.base_url).rstrip("/")},
            )
        )
        planned = planned_usage(job.params)
        answer = {
            "id": job.id,
            "polling_url": f"{services.origin(http_request)}/v1/get_result?id={job.id}",
            "cost": cost(planned["input_mp"], planned["output_mp"]),
            **planned,
        }
        if wire.webhook_url:
            answer.update(status="Pending", webhook_url=wire.webhook_url)
        return answer

    @router.get(
        "/v1/get_result",
        summary="Poll a BFL job",
        responses=openapi.errors(openapi.BFLError, (401, 503), {422: openapi.BFLValidationError}),
    )
    async def get_result(id: str, http_request: Request) -> dict[str, Any]:
        owner = service.caller(services, http_request)
        try:  # on a thread: the store may wait seconds for another process's write lock
            job = await asyncio.to_thread(services.store.get, id, owner)
        except NotFound:  # not StoreUnavailable: a store that cannot answer says so (503)
            return {"id": id, "status": "Task not found", "result": None, "progress": None}
        told = outcome(services, job, services.origin(http_request))
        return {
            "id": job.id,
            "status": told.status,
            "result": told.result,
            "progress": job.progress,
            "details": {"error": told.error} if told.error else None,
            "preview": None,
        }

    return router
