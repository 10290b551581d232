"""What every dialect shares: the typed services, authentication, the path from a GenerateRequest to
encoded images, and usage figures. Dialect modules translate; this module does the work once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import FormData, UploadFile

from kleinserve.api.auth import KeyStore, authenticate
from kleinserve.api.loras import AdapterSource
from kleinserve.engine.protocol import SIZE_MULTIPLE, ModelSpec
from kleinserve.errors import Cancelled, EngineError, InvalidInput, UnknownModel
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.intake import Intake, ModelResolver, Pending
from kleinserve.jobs.record import JobResult, JobUsage
from kleinserve.jobs.store import Job, JobStatus, JobStore
from kleinserve.media import ImageFetcher, MediaStore
from kleinserve.types import GenerateRequest, ImageFormat, StepCallback, encode_image, json_bytes

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
# Names under which clients ask for FLUX.2 [klein] 4B in the dialects we speak.
KLEIN_4B_ALIASES = (
    "flux-2-klein-4b",
    "@cf/black-forest-labs/flux-2-klein-4b",
    "bfl/flux-2-klein-4b",
    "black-forest-labs/FLUX.2-klein-4B",
)


class JSONBody(JSONResponse):
    """Starlette's JSONResponse rendered by `json_bytes` (orjson, ten times pydantic-core's speed for a body
    with an image). Every JSON answer of the API is one (app.py's default response class)."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


@dataclass(frozen=True)
class Services:
    """Everything the routes need, built once at start-up (api/server.py, scale/api.py) and passed to
    build_app. `model` is the variant served, for what needs no queue (its spec, resolving a request); `jobs`
    accepts jobs (in `kleinserve serve` it is the one-box Worker that also runs them); `loras` turns a
    request's `loras` value into its adapters (api/loras.py)."""

    model: ModelResolver
    jobs: Intake
    store: JobStore
    hub: EventHub
    keys: KeyStore
    media: MediaStore
    fetcher: ImageFetcher
    loras: AdapterSource
    # The server's public origin ("https://host[/prefix]", no trailing slash) for the absolute URLs of the
    # asynchronous dialect (its polling URL, its webhooks' results); None: the origin a request was made to.
    public_url: str | None = None

    def origin(self, http_request: Request) -> str:
        """Where absolute URLs in answers start (result links, BFL's polling URL): `public_url` (a proxy's
        address, --public-url), else the origin `http_request` was made to; no trailing slash."""
        return self.public_url or str(http_request.base_url).rstrip("/")

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Accepted model ids: the klein-4B names (the API contract clients are written against) and the
        loaded variant's own name, so the same client code works whichever weights are loaded."""
        return (*KLEIN_4B_ALIASES, self.spec.name)

    def check_model(self, model: str | None) -> str:
        """The public model id for `model` (None means the default); UnknownModel otherwise."""
        if model is None or model in self.model_ids:
            return KLEIN_4B_ALIASES[0] if model in (None, *KLEIN_4B_ALIASES) else model
        raise UnknownModel(
            f"model {model!r} is not served here", param="model", allowed=", ".join(self.model_ids)
        )


def caller(services: Services, request: Request) -> str:
    """The authenticated key name (raises Unauthorized)."""
    return authenticate(services.keys, request.headers)


async def read_json_object(request: Request, require_json_type: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; InvalidInput for a wrong content type or malformed JSON.

    Parsed by orjson, which refuses what Python's json module let through to fail later as a 500: nesting
    over 1024 levels (json: RecursionError), integers of over 4300 digits (json: ValueError; orjson reads
    integers beyond 64 bits as floats, out of every range we accept), lone surrogates such as "\\ud800"
    (json: a str that the store, the tokenizer and every JSON writer refuse) and NaN/Infinity (not JSON).
    On the event loop, even for large bodies: orjson holds the GIL, so a thread would not free the loop
    (README, Performance).
    """
    if require_json_type and "json" not in request.headers.get("content-type", ""):
        raise InvalidInput("expected a JSON body", allowed="Content-Type: application/json")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON body ({exc})", allowed="a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidInput("the JSON body must be an object", allowed="a JSON object")
    return body


@contextlib.asynccontextmanager
async def read_form(request: Request, **limits: int) -> AsyncIterator[FormData]:
    """The multipart form (starlette's `request.form(**limits)`), its uploads closed on leaving, even on
    errors. InvalidInput for a text field that is not Unicode text: starlette decodes fields in the charset
    the Content-Type names, and some (utf-7, unicode_escape) yield lone surrogates, which the store, the
    tokenizer and every JSON writer refuse."""
    async with request.form(**limits) as form:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile) or value.isascii():  # ASCII (base64 above all): no copy made
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidInput(
                    f"{name} is not valid Unicode text ({exc.reason} at character {exc.start})",
                    param=name,
                    allowed="UTF-8 text",
                ) from None
        yield form


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (its queue place is freed, or its running
    work is cancelled at the next step) and raising Cancelled, which is rendered for nobody.

    Cancelled rather than a bare CancelledError: the request's own task is not being cancelled, and uvicorn
    logs any exception that leaves the app as "Exception in ASGI application" with a traceback.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise Cancelled("the client disconnected")
    finally:
        if not task.done():
            task.cancel()


@dataclass(frozen=True)
class Completed:
    """A succeeded job as a synchronous dialect answers it: the job row, its result (sizes, seeds, media
    names) and its images' encoded bytes (in the requested format, as stored), in the result's order."""

    job: Job
    result: JobResult
    images: list[bytes]


def usage_fields(usage: JobUsage | None) -> dict[str, float]:
    """kleinserve's metering as the dialects report it beside their own fields: the JobUsage field names
    (jobs/metering.py says what each counts); empty for a job without usage."""
    return asdict(usage) if usage is not None else {}


async def submit(
    services: Services, owner: str, request: GenerateRequest, on_step: StepCallback | None = None
) -> Pending:
    """Store and queue `request` as a job of `owner`; raises (InvalidInput, Overloaded, Unavailable ...)
    before anything is answered, so that a streaming route can still answer those as HTTP errors."""
    return await services.jobs.enqueue(request, owner, on_step)


async def finish(services: Services, http_request: Request, pending: Pending) -> Completed:
    """Wait for a submitted job (a client disconnect cancels it); Cancelled or EngineError if it did not
    succeed."""
    outcome = await until_disconnected(http_request, services.jobs.wait(pending))
    job = outcome.job
    if job.status is JobStatus.CANCELLED:
        raise Cancelled(job.error or "cancelled")
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        raise EngineError(f"generation failed: {job.error}")
    return Completed(job, job.result, list(outcome.images))


async def generate(
    services: Services,
    http_request: Request,
    owner: str,
    request: GenerateRequest,
    on_step: StepCallback | None = None,
) -> Completed:
    """`submit`, then `finish`: the synchronous dialects' whole request."""
    return await finish(services, http_request, await submit(services, owner, request, on_step))


async def encode_all(images: Sequence[Image.Image], fmt: ImageFormat, quality: int | None) -> list[bytes]:
    """PNG/JPEG/WebP bytes of every image, encoded on worker threads (never the engine's or the loop's)."""
    return await asyncio.gather(*(asyncio.to_thread(encode_image, image, fmt, quality) for image in images))


def partial_steps(total_steps: int, partial_images: int) -> list[int]:
    """Steps (1-based, before the last) whose previews are sent when `partial_images` partials are asked for,
    spread evenly: 4 steps with 3 partials -> [1, 2, 3]; with 1 partial -> [2]."""
    count = min(partial_images, total_steps - 1)
    return sorted({max(1, round(i * total_steps / (count + 1))) for i in range(1, count + 1)})


# --- masks and strength: each dialect's mask convention as GenerateRequest.mask ("L", >= 128 repaints) ----

# Pillow's lookup table for an alpha channel: 0 (fully transparent) -> 255 (repaint), any other -> 0 (keep).
_TRANSPARENT_REPAINTS = [255] + [0] * 255


def transparent_mask(image: Image.Image, param: str) -> Image.Image:
    """OpenAI's mask as kleinserve's: its fully transparent pixels (alpha 0) are repainted (255), all others
    kept (0), as an "L" image of the same size. InvalidInput naming `param` for an image without
    transparency (no alpha channel, no transparent palette entry): OpenAI refuses those too. Converts every
    pixel: call it off the event loop."""
    if not image.has_transparency_data:
        raise InvalidInput(
            f"{param} has no transparency: its fully transparent pixels mark what to repaint",
            param=param,
            allowed="a PNG with an alpha channel",
        )
    return image.convert("RGBA").getchannel("A").point(_TRANSPARENT_REPAINTS)


def white_mask(image: Image.Image, param: str) -> Image.Image:
    """BFL's fill convention as kleinserve's: white is repainted, black kept: the image's luminance as an
    "L" image (>= 128 repaints). Any image is one; `param` only keeps the conventions' signatures alike."""
    return image.convert("L")


def either_mask(image: Image.Image, param: str) -> Image.Image:
    """A mask in either convention, told apart by its pixels: with a fully transparent pixel it is OpenAI's
    (transparent_mask), otherwise BFL's (white_mask). For the AI SDK's `mask`, whose meaning is each
    provider's own (it is passed through as it is). Off the event loop."""
    transparent = image.has_transparency_data and image.convert("RGBA").getchannel("A").getextrema()[0] == 0
    return transparent_mask(image, param) if transparent else white_mask(image, param)


def requested_size(
    references: Sequence[Image.Image],
    width: int | None,
    height: int | None,
    param: str,
    editing: bool,
) -> tuple[int | None, int | None]:
    """The (width, height) a dialect passes on: as asked (pixels; None where not asked) unless `editing`
    (a mask or strength), whose output has the size of the image edited (`references[0]`): a size asked for
    must be that one, both floored to multiples of SIZE_MULTIPLE as every size is, or InvalidInput names the
    dialect's `param`; then (None, None), the engine's own derivation. No references: the engine refuses the
    request itself (a mask without an image)."""
    if not editing:
        return width, height
    if references and (width is not None or height is not None):
        edited_width, edited_height = references[0].size
        asked = (width or edited_width, height or edited_height)
        if _floored(asked) != _floored((edited_width, edited_height)):
            raise InvalidInput(
                f"{param}: {width or 'auto'}x{height or 'auto'} differs from the image edited, "
                f"{edited_width}x{edited_height} (with a mask or strength the output has its size)",
                param=param,
                allowed="no size: the image's own",
            )
    return None, None


def _floored(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) with both sides floored to multiples of SIZE_MULTIPLE pixels."""
    return size[0] - size[0] % SIZE_MULTIPLE, size[1] - size[1] % SIZE_MULTIPLE
