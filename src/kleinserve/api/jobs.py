"""kleinserve's own job API: inspect, follow, cancel and list jobs (any dialect's jobs, per key).

    GET  /v1/jobs/{id}            the job: status, progress, result URLs, usage, webhook outcome
    GET  /v1/jobs/{id}/events     Server-Sent Events: queued (position), each step (small preview), the end
    POST /v1/jobs/{id}/cancel     queued: cancelled at once; running: at the next step boundary, unless it
                                  ends first (the answer says so); ended: 409
    GET  /v1/jobs?status=&limit=  the key's jobs, newest first
A job is answered as `JobBody`, this API's wire model built from the typed row: what the store keeps may
change without changing what clients (and the playground, web/gallery.js) read. Errors use OpenAI's body
`{"error": {...}}` (the routes are OpenAIRoutes). Store calls run on threads: one may wait seconds for
another process's write lock (jobs/store.py), and the event loop must go on serving meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from kleinserve.api import openapi, service
from kleinserve.api.openai import OpenAIRoute
from kleinserve.api.service import Services
from kleinserve.errors import InvalidInput
from kleinserve.jobs.events import TERMINAL_EVENTS
from kleinserve.jobs.record import JobParams, JobResult
from kleinserve.jobs.store import Job, JobStatus
from kleinserve.media import MediaStore
from kleinserve.types import json_bytes

HEARTBEAT_S = 15.0


@dataclass(frozen=True)
class ParamsBody:
    """What the job asked for, as resolved: sizes in pixels, `guidance` null where the variant's default
    applies, `reference_sizes` [width, height] of each reference as prepared, `loras` the adapters applied
    as `{name, scale}` (a downloaded one named `sha256:<hex>`), which a request's `loras` may send again;
    `mask` whether it repainted under a mask, `strength` its image-to-image strength (null: not an edit, or a
    mask at the default 1.0)."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float | None
    seed: int
    num_images: int
    negative_prompt: str
    max_sequence_length: int
    output_format: str
    output_quality: int | None
    reference_sizes: list[list[int]]
    loras: list[dict[str, Any]]
    mask: bool
    strength: float | None

    @classmethod
    def of(cls, params: JobParams) -> ParamsBody:
        return cls(
            prompt=params.prompt,
            width=params.width,
            height=params.height,
            steps=params.steps,
            guidance=params.guidance,
            seed=params.seed,
            num_images=params.num_images,
            negative_prompt=params.negative_prompt,
            max_sequence_length=params.max_sequence_length,
            output_format=params.output_format.value,
            output_quality=params.output_quality,
            reference_sizes=[list(size) for size in params.reference_sizes],
            loras=[{"name": choice.adapter, "scale": choice.scale} for choice in params.loras],
            mask=params.masked,
            strength=params.strength,
        )


@dataclass(frozen=True)
class ImageBody:
    url: str | None  # a signed link; null once the images are past the media lifetime
    seed: int


@dataclass(frozen=True)
class ResultBody:
    """A succeeded job's images and the parameters used. Past the media lifetime its images are deleted:
    their `url` is null and `expired` true, rather than a link to a file that is gone."""

    width: int
    height: int
    steps: int
    guidance: float
    prompt_tokens: int
    images: list[ImageBody]
    expired: bool

    @classmethod
    def of(cls, result: JobResult, links: list[str | None], expired: bool) -> ResultBody:
        images = [ImageBody(url, image.seed) for url, image in zip(links, result.images, strict=True)]
        return cls(
            result.width, result.height, result.steps, result.guidance, result.prompt_tokens, images, expired
        )


@dataclass(frozen=True)
class JobBody:
    """A job as GET /v1/jobs/{id} (and the list, and cancel) answers it; times are Unix seconds."""

    id: str
    status: str
    progress: float
    created: float
    started: float | None
    finished: float | None
    error: str | None
    params: ParamsBody
    result: ResultBody | None
    usage: dict[str, float] | None
    webhook_status: str | None
    cancel_requested: bool

    @classmethod
    def of(cls, job: Job, media: MediaStore, base_url: str) -> JobBody:
        """`job`'s answer; its images' links are `base_url` + a signed media path."""
        result = None
        if job.result is not None:
            expired = media.expired(job.finished)
            links = [None if expired else base_url + media.signed_path(i.media) for i in job.result.images]
            result = ResultBody.of(job.result, links, expired)
        return cls(
            id=job.id,
            status=job.status.value,
            progress=job.progress,
            created=job.created,
            started=job.started,
            finished=job.finished,
            error=job.error,
            params=ParamsBody.of(job.params),
            result=result,
            usage=service.usage_fields(job.usage) or None,
            webhook_status=job.webhook_status,
            cancel_requested=job.cancel_requested,
        )


def job_body(services: Services, job: Job, base_url: str) -> dict[str, Any]:
    """`JobBody` of `job` as JSON values."""
    return asdict(JobBody.of(job, services.media, base_url))


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json_bytes(event).decode()}\n\n"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return openapi.errors(openapi.ErrorBody, statuses)


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["Jobs"], route_class=OpenAIRoute)

    @router.get("/v1/jobs", summary="List this key's jobs", responses=_errors(400, 401, 503))
    async def list_jobs(
        http_request: Request, status: str | None = None, limit: int = Query(50, ge=1, le=500)
    ) -> dict[str, Any]:
        owner = service.caller(services, http_request)
        try:
            wanted = JobStatus(status) if status else None
        except ValueError:
            allowed = ", ".join(s.value for s in JobStatus)
            raise InvalidInput(f"unknown status {status!r}", param="status", allowed=allowed) from None
        base_url = services.origin(http_request)
        jobs = await asyncio.to_thread(services.store.owned, owner, wanted, limit)
        return {"object": "list", "data": [job_body(services, job, base_url) for job in jobs]}

    @router.get("/v1/jobs/{job_id}", summary="One job", responses=_errors(401, 404, 503))
    async def get_job(job_id: str, http_request: Request) -> dict[str, Any]:
        owner = service.caller(services, http_request)
        job = await asyncio.to_thread(services.store.get, job_id, owner)
        return job_body(services, job, services.origin(http_request))

    @router.post("/v1/jobs/{job_id}/cancel", summary="Cancel a job", responses=_errors(401, 404, 409, 503))
    async def cancel_job(job_id: str, http_request: Request) -> dict[str, Any]:
        owner = service.caller(services, http_request)
        job = await asyncio.to_thread(services.jobs.cancel, job_id, owner)
        body = job_body(services, job, services.origin(http_request))
        if job.status is JobStatus.RUNNING:  # what will happen, since a job may end before its next step
            body["message"] = (
                "cancel requested: the job stops at its next denoising step, unless it finishes first; "
                f"GET /v1/jobs/{job.id} says which"
            )
        return body

    @router.get(
        "/v1/jobs/{job_id}/events",
        summary="Follow a job (Server-Sent Events)",
        responses=_errors(401, 404, 503),
    )
    async def job_events(job_id: str, http_request: Request) -> StreamingResponse:
        owner = service.caller(services, http_request)
        await asyncio.to_thread(services.store.get, job_id, owner)  # NotFound before the stream starts
        return StreamingResponse(_follow(services, job_id), media_type="text/event-stream")

    return router


async def _follow(services: Services, job_id: str) -> AsyncIterator[str]:
    async with services.hub.subscribe(job_id) as events:
        job = await asyncio.to_thread(services.store.get, job_id)
        if job.status is JobStatus.QUEUED:
            queued = [j.id for j in await asyncio.to_thread(services.store.queued)]
            position = queued.index(job_id) + 1 if job_id in queued else 1
            yield _sse({"type": "queued", "position": position})
        elif job.status is JobStatus.RUNNING:
            yield _sse({"type": "running", "progress": job.progress})
        if job.status.terminal:
            yield _sse({"type": job.status.value, **({"error": job.error} if job.error else {})})
            return
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=HEARTBEAT_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            yield _sse(event)
            if event["type"] in TERMINAL_EVENTS:
                return
