"""What a job stores about its request, and what it used.

Usage per job (`usage`): 512x512 tiles in and out (`ceil(w/512) * ceil(h/512)` per image), megapixels in and
out, steps and engine seconds. Each API dialect reports it in its own fields (and prices it, where its wire
format has a price); `kleinserve usage` sums it per key.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from kleinserve.engine.protocol import ResolvedRequest
from kleinserve.types import GenerateRequest, GenerateResult, ImageFormat


def tiles(width: int, height: int) -> int:
    return math.ceil(width / 512) * math.ceil(height / 512)


def request_params(request: GenerateRequest, resolved: ResolvedRequest) -> dict[str, Any]:
    """The request as JSON, with the size and seed fixed so that a re-run after a restart is identical."""
    return {
        "prompt": request.prompt,
        "width": resolved.width,
        "height": resolved.height,
        "steps": resolved.steps,
        "guidance": request.guidance,
        "seed": resolved.seeds[0],
        "num_images": request.num_images,
        "negative_prompt": request.negative_prompt,
        "max_sequence_length": resolved.max_sequence_length,
        "output_format": request.output_format.value,
        "output_quality": request.output_quality,
        "reference_sizes": [list(reference.size) for reference in resolved.references],
    }


def params_request(params: dict[str, Any], references: list[Image.Image]) -> GenerateRequest:
    return GenerateRequest(
        prompt=params["prompt"],
        width=params["width"],
        height=params["height"],
        steps=params["steps"],
        guidance=params["guidance"],
        seed=params["seed"],
        num_images=params["num_images"],
        reference_images=tuple(references),
        negative_prompt=params["negative_prompt"],
        max_sequence_length=params["max_sequence_length"],
        output_format=ImageFormat(params["output_format"]),
        output_quality=params["output_quality"],
    )


def usage(result: GenerateResult, engine_seconds: float) -> dict[str, Any]:
    count = len(result.images)
    inputs = result.reference_sizes
    return {
        "images": count,
        "tiles_in": sum(tiles(w, h) for w, h in inputs),
        "tiles_out": count * tiles(result.width, result.height),
        "megapixels_in": round(sum(w * h for w, h in inputs) / 1e6, 4),
        "megapixels_out": round(count * result.width * result.height / 1e6, 4),
        "steps": result.steps,
        "engine_seconds": round(engine_seconds, 3),
    }
