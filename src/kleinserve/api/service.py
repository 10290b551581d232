"""What every dialect shares: the typed services, authentication, the path from a GenerateRequest to
encoded images, and usage figures. Dialect modules translate; this module does the work once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from PIL import Image

from kleinserve.api.auth import KeyStore, authenticate
from kleinserve.engine.spec import ModelSpec
from kleinserve.errors import Cancelled, UnknownModel
from kleinserve.jobs.runner import EngineRunner
from kleinserve.media import ImageFetcher, MediaStore
from kleinserve.types import (
    GeneratedImage,
    GenerateRequest,
    GenerateResult,
    ImageFormat,
    StepCallback,
    encode_image,
)

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
# Names under which clients ask for FLUX.2 [klein] 4B in the dialects we speak.
KLEIN_4B_ALIASES = (
    "flux-2-klein-4b",
    "@cf/black-forest-labs/flux-2-klein-4b",
    "bfl/flux-2-klein-4b",
    "black-forest-labs/FLUX.2-klein-4B",
)


@dataclass(frozen=True)
class Services:
    """Everything the routes need, built once at start-up (cli.py) and passed to build_app."""

    runner: EngineRunner
    keys: KeyStore
    media: MediaStore
    fetcher: ImageFetcher

    @property
    def spec(self) -> ModelSpec:
        return self.runner.pipeline.spec

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


async def generate(
    services: Services, http_request: Request, request: GenerateRequest, on_step: StepCallback | None = None
) -> GenerateResult:
    return await until_disconnected(http_request, services.runner.generate(request, on_step))


async def encode_all(
    images: Sequence[GeneratedImage | Image.Image], fmt: ImageFormat, quality: int | None
) -> list[bytes]:
    """PNG/JPEG/WebP bytes of every image, encoded on worker threads (never the engine's or the loop's)."""
    pictures = [image.image if isinstance(image, GeneratedImage) else image for image in images]
    return await asyncio.gather(*(asyncio.to_thread(encode_image, p, fmt, quality) for p in pictures))


def tiles(width: int, height: int) -> int:
    """Cloudflare-style 512x512 tiles of one image."""
    return math.ceil(width / 512) * math.ceil(height / 512)


def output_tokens(result: GenerateResult) -> int:
    """Latent tokens generated: (W/16)*(H/16) per image."""
    return (result.width // 16) * (result.height // 16) * len(result.images)


def partial_steps(total_steps: int, partial_images: int) -> list[int]:
    """Steps (1-based, before the last) whose previews are sent when `partial_images` partials are asked for,
    spread evenly: 4 steps with 3 partials -> [1, 2, 3]; with 1 partial -> [2]."""
    count = min(partial_images, total_steps - 1)
    return sorted({max(1, round(i * total_steps / (count + 1))) for i in range(1, count + 1)})
