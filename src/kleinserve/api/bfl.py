"""Black Forest Labs' async API: POST /v1/flux-2-klein-4b, then poll GET /v1/get_result?id=...

Submit answers at once with `{id, polling_url (absolute), cost, input_mp, output_mp}`; the job runs in the
queue. Polling answers `{id, status: Pending | Ready | Error | Task not found, result, progress}`;
`result.sample` is a signed URL that a plain GET (the BFL clients send their `x-key` along; it is not
needed) turns into the image bytes. `webhook_url` + `webhook_secret` get a signed POST on completion
(jobs/webhooks.py). Errors use BFL's bodies: 422 `{"detail": [{loc, msg, type}]}`,
429 `{"error": "rate_limit_exceeded", ...}`.

BFL's klein endpoints take no `steps`/`guidance` (the distilled model is fixed at 4 steps, guidance 1.0),
and a distilled variant here ignores them too, as BFL does. The base variants, which BFL does not host, take
them under the names of BFL's FLUX.2 [flex] endpoint, so that a BFL-shaped job (and the playground) can set
them.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kleinserve.api import openapi, service
from kleinserve.api.service import Services
from kleinserve.errors import InvalidInput, KleinError, NotFound, Overloaded
from kleinserve.jobs import metering
from kleinserve.jobs.store import Job, JobStatus
from kleinserve.types import GenerateRequest, ImageFormat

PREFIXES = ("/v1/flux-", "/v1/get_result")
_STATUS = {
    JobStatus.QUEUED: "Pending",
    JobStatus.RUNNING: "Pending",
    JobStatus.SUCCEEDED: "Ready",
    JobStatus.FAILED: "Error",
    JobStatus.CANCELLED: "Error",
}
_FORMATS = {"jpeg": ImageFormat.JPEG, "png": ImageFormat.PNG, "webp": ImageFormat.WEBP}


class FluxKleinInputs(BaseModel):
    """BFL's Flux2KleinInputs plus [flex]'s steps/guidance (base variants only); unknown fields
    (aspect_ratio, raw ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=32000)
    input_image: str | None = None
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 8)
    width: int | None = Field(None, ge=0, le=2048, description="multiple of 16, min 64; 0 or absent = auto")
    height: int | None = Field(None, ge=0, le=2048, description="multiple of 16, min 64; 0 or absent = auto")
    steps: int | None = Field(None, ge=1, le=50, description="base variants only; distilled: ignored")
    guidance: float | None = Field(None, ge=0, le=10, description="base variants only; distilled: ignored")
    safety_tolerance: int | None = Field(None, ge=0, le=6, description="accepted, not applied")
    output_format: Literal["jpeg", "png", "webp"] | None = "jpeg"
    webhook_url: str | None = Field(None, min_length=1, max_length=2083)
    webhook_secret: str | None = None


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


def to_request(wire: FluxKleinInputs, references: list[Any], distilled: bool = True) -> GenerateRequest:
    """The internal request; `steps`/`guidance` apply only when the loaded variant is not `distilled`."""
    _check_webhook_url(wire.webhook_url)
    if not wire.prompt.strip():
        raise InvalidInput("prompt is empty", param="prompt", allowed="1-32000 characters")
    return GenerateRequest(
        prompt=wire.prompt,
        width=_side(wire.width, "width"),
        height=_side(wire.height, "height"),
        steps=None if distilled else wire.steps,
        guidance=None if distilled else wire.guidance,
        seed=wire.seed,
        reference_images=tuple(references),
        output_format=_FORMATS[wire.output_format or "jpeg"],
    )


def render_error(exc: KleinError) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
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


def result_body(services: Services, job: Job, base_url: str) -> dict[str, Any] | None:
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        return None
    first = job.result["images"][0]
    return {
        "sample": base_url + services.media.signed_path(first["media"]),
        "seed": first["seed"],
        "prompt": job.params["prompt"],
        "start_time": job.started,
        "end_time": job.finished,
        "duration": round((job.finished or 0) - (job.started or 0), 3),
    }


def webhook_body(services: Services, job: Job) -> dict[str, Any]:
    """What BFL posts to a webhook_url: Ready with the result, or Error with a message."""
    base = {"id": job.id, "status": _STATUS[job.status], "timestamp": int(time.time())}
    result = result_body(services, job, job.extra.get("base_url", ""))
    if result is not None:
        return {**base, "result": result}
    return {**base, "error": job.status.value, "message": job.error or job.status.value}


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["Black Forest Labs"])

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
        try:
            wire = FluxKleinInputs.model_validate(await service.read_json_object(http_request))
        except ValidationError as exc:
            error = exc.errors()[0]
            param = ".".join(str(part) for part in error["loc"]) or None
            raise InvalidInput(f"{param}: {error['msg']}", param=param) from None
        fields = ("input_image", "input_image_2", "input_image_3", "input_image_4")
        references = [
            await services.fetcher.image(value, name) for name in fields if (value := getattr(wire, name))
        ]
        base_url = str(http_request.base_url).rstrip("/")
        job = await asyncio.to_thread(
            functools.partial(
                services.worker.submit,
                to_request(wire, references, services.spec.distilled),
                owner,
                webhook_url=wire.webhook_url,
                webhook_secret=wire.webhook_secret,
                extra={"base_url": base_url},
            )
        )
        planned = metering.planned_usage(job.params)
        answer = {
            "id": job.id,
            "polling_url": f"{base_url}/v1/get_result?id={job.id}",
            "cost": metering.bfl_cost(planned["input_mp"], planned["output_mp"]),
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
        base_url = str(http_request.base_url).rstrip("/")
        if job.status is JobStatus.SUCCEEDED and services.media.expired(job.finished):
            expired = f"the result expired: images are kept {services.media.ttl_s} s after the job ends"
            return {
                "id": job.id,
                "status": "Error",
                "result": None,
                "progress": 1.0,
                "details": {"error": expired},
            }
        return {
            "id": job.id,
            "status": _STATUS[job.status],
            "result": result_body(services, job, base_url),
            "progress": job.progress,
            "details": {"error": job.error} if job.error else None,
            "preview": None,
        }

    return router
