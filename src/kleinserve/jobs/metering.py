"""What a job stores about its request, and what it used.

Usage per job (`usage`): Cloudflare-style 512x512 tiles in and out (`ceil(w/512) * ceil(h/512)` per image),
megapixels in and out, steps and engine seconds. Dialects report it their way: BFL `cost`/`input_mp`/
`output_mp`, OpenAI `usage`; `kleinserve usage` sums it per key.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from kleinserve.engine.pipeline import ResolvedRequest
from kleinserve.types import GenerateRequest, GenerateResult, ImageFormat

# BFL's klein-4b price (credits, 1 credit = 1 US cent): first output megapixel, then per further megapixel in
# or out (wire-formats.md section 4.7).
BFL_FIRST_MP_CREDITS = 1.4
BFL_MP_CREDITS = 0.1


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


def planned_usage(params: dict[str, Any]) -> dict[str, float]:
    """Megapixels in and out known at submit time (BFL answers them before the job runs)."""
    inputs = params.get("reference_sizes", [])
    return {
        "input_mp": round(sum(w * h for w, h in inputs) / 1e6, 2),
        "output_mp": round(params["num_images"] * params["width"] * params["height"] / 1e6, 2),
    }


def bfl_cost(input_mp: float, output_mp: float) -> float:
    """BFL's klein-4b price in credits for the given megapixels."""
    return round(
        BFL_FIRST_MP_CREDITS + max(0.0, output_mp - 1) * BFL_MP_CREDITS + input_mp * BFL_MP_CREDITS, 3
    )
