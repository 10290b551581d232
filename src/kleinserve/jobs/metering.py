"""What a succeeded job used (`JobUsage`, jobs/record.py).

Usage per job: 512x512 tiles in and out (`ceil(w/512) * ceil(h/512)` per image), megapixels in and out, steps,
engine seconds, and adapter images: images x the LoRA adapters applied to each (a request's adapters apply to
all its images). Each API dialect reports it in its own fields (and prices it, where its wire format has a
price); `kleinserve usage` sums it per key.
"""

from __future__ import annotations

import math

from kleinserve.jobs.record import JobUsage
from kleinserve.types import GenerateResult


def tiles(width: int, height: int) -> int:
    return math.ceil(width / 512) * math.ceil(height / 512)


def usage(result: GenerateResult, engine_seconds: float, adapters: int = 0) -> JobUsage:
    """The usage of one request's `result` (references as prepared), which took `engine_seconds` with
    `adapters` LoRA adapters applied."""
    count = len(result.images)
    inputs = result.reference_sizes
    return JobUsage(
        images=count,
        tiles_in=sum(tiles(w, h) for w, h in inputs),
        tiles_out=count * tiles(result.width, result.height),
        megapixels_in=round(sum(w * h for w, h in inputs) / 1e6, 4),
        megapixels_out=round(count * result.width * result.height / 1e6, 4),
        steps=result.steps,
        engine_seconds=round(engine_seconds, 3),
        adapter_images=count * adapters,
    )
