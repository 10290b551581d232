"""The job record codec (jobs/record.py): typed records <-> the store's JSON, old rows, and the request's
way from one resolution at submit to the same resolution on the engine thread."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import orjson
import torch
from PIL import Image

from kleinserve.engine.resolve import resolve_request, restore_request
from kleinserve.engine.spec import ModelSpec
from kleinserve.jobs.record import (
    JobImage,
    JobParams,
    JobResult,
    JobUsage,
    from_json,
    stored_images,
    to_json,
)
from kleinserve.jobs.store import JobStatus, SqliteJobStore
from kleinserve.types import (
    GeneratedImage,
    GenerateRequest,
    GenerateResult,
    ImageFormat,
    LoraChoice,
    json_bytes,
)
from tests.conftest import random_image

BASE = ModelSpec("base", distilled=False, default_steps=50, default_guidance=4.0, parameters=0)
DISTILLED = ModelSpec("distilled", distilled=True, default_steps=4, default_guidance=1.0, parameters=0)

PARAMS = JobParams(
    prompt="a fox",
    width=96,
    height=64,
    steps=3,
    seed=7,
    max_sequence_length=77,
    guidance=2.5,
    num_images=2,
    negative_prompt="blur",
    output_format=ImageFormat.WEBP,
    output_quality=80,
    reference_sizes=((64, 80), (96, 64)),
    loras=(LoraChoice("watercolour", 0.5), LoraChoice("sha256:" + "ab" * 32)),
)
RESULT = JobResult(
    images=(JobImage(media="a.webp", seed=7), JobImage(media="b.webp", seed=8)),
    width=96,
    height=64,
    steps=3,
    guidance=2.5,
    prompt_tokens=12,
)
USAGE = JobUsage(
    images=2,
    tiles_in=2,
    tiles_out=2,
    megapixels_in=0.0113,
    megapixels_out=0.0123,
    steps=3,
    engine_seconds=0.25,
)
# A row's JSON as the version before the typed records wrote it (jobs/metering.py's request_params,
# Worker._store_result's summary and metering.usage).
OLD_PARAMS = {
    "prompt": "a fox",
    "width": 64,
    "height": 64,
    "steps": 4,
    "guidance": None,
    "seed": 1,
    "num_images": 1,
    "negative_prompt": "",
    "max_sequence_length": 512,
    "output_format": "png",
    "output_quality": None,
    "reference_sizes": [[64, 80]],
}
OLD_RESULT = {
    "images": [{"media": "x.png", "seed": 1}],
    "width": 64,
    "height": 64,
    "steps": 4,
    "guidance": 1,
    "prompt_tokens": 9,
}
OLD_USAGE = {
    "images": 1,
    "tiles_in": 1,
    "tiles_out": 1,
    "megapixels_in": 0.0051,
    "megapixels_out": 0.0041,
    "steps": 4,
    "engine_seconds": 0.5,
}


def test_records_round_trip_through_json() -> None:
    for record in (PARAMS, RESULT, USAGE):
        stored = orjson.loads(json_bytes(to_json(record)))
        assert from_json(type(record), stored) == record


def test_json_keys_are_the_field_names_and_values_plain_json() -> None:
    assert to_json(PARAMS) == {
        "prompt": "a fox",
        "width": 96,
        "height": 64,
        "steps": 3,
        "seed": 7,
        "max_sequence_length": 77,
        "guidance": 2.5,
        "num_images": 2,
        "negative_prompt": "blur",
        "output_format": "webp",
        "output_quality": 80,
        "fixed_by_variant": False,
        "reference_sizes": [[64, 80], [96, 64]],
        "loras": [{"adapter": "watercolour", "scale": 0.5}, {"adapter": "sha256:" + "ab" * 32, "scale": 1.0}],
        "strength": None,
        "masked": False,
    }
    assert to_json(RESULT)["images"] == [{"media": "a.webp", "seed": 7}, {"media": "b.webp", "seed": 8}]


def test_rows_of_the_previous_version_load() -> None:
    params = from_json(JobParams, OLD_PARAMS)
    assert params == JobParams(
        prompt="a fox",
        width=64,
        height=64,
        steps=4,
        seed=1,
        max_sequence_length=512,
        reference_sizes=((64, 80),),
    )
    result = from_json(JobResult, OLD_RESULT)
    assert result.images == (JobImage(media="x.png", seed=1),) and result.prompt_tokens == 9
    assert isinstance(result.guidance, float)  # JSON wrote it as 1
    assert from_json(JobUsage, OLD_USAGE) == JobUsage(**OLD_USAGE)


def test_a_missing_key_takes_its_default_and_an_unknown_key_is_ignored() -> None:
    older = {key: value for key, value in OLD_RESULT.items() if key != "prompt_tokens"}
    assert from_json(JobResult, older).prompt_tokens == 0
    newer = {**OLD_PARAMS, "style": "a field of a newer version"}
    assert from_json(JobParams, newer) == from_json(JobParams, OLD_PARAMS)
    assert from_json(JobUsage, {"images": 1}) == JobUsage(images=1)


def test_the_store_loads_a_row_written_before_the_records(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "db")
    try:
        row = {
            "id": "old",
            "owner": "alice",
            "status": "succeeded",
            "params": json_bytes(OLD_PARAMS).decode(),
            "reference_count": 0,
            "batch_key": "",
            "created": time.time(),
            "result": json_bytes(OLD_RESULT).decode(),
            "usage": json_bytes(OLD_USAGE).decode(),
        }
        with sqlite3.connect(tmp_path / "db") as db:
            db.execute(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
        job = store.get("old")
    finally:
        store.close()
    assert job.status is JobStatus.SUCCEEDED
    assert job.params == from_json(JobParams, OLD_PARAMS)
    assert job.result == from_json(JobResult, OLD_RESULT)
    assert job.usage == JobUsage(**OLD_USAGE)


def test_every_request_field_but_the_images_is_recorded() -> None:
    """JobParams is a GenerateRequest: a field added to the request is stored, read back and handed to the
    engine with no line in jobs/ (the images, references and mask, are files beside the row)."""
    assert issubclass(JobParams, GenerateRequest)
    request_fields = {field.name for field in fields(GenerateRequest)} - {"reference_images", "mask"}
    stored = to_json(PARAMS)
    assert request_fields <= set(stored)
    assert "reference_images" not in stored and "mask" not in stored
    assert from_json(JobParams, stored).to_request(()) == GenerateRequest(
        **{name: getattr(PARAMS, name) for name in request_fields}
    )


def test_from_resolved_and_to_request_keep_every_value() -> None:
    request = GenerateRequest(
        prompt="a fox",
        width=100,
        height=70,
        steps=3,
        guidance=2.5,
        seed=7,
        num_images=2,
        reference_images=(random_image(72, 80, seed=1, mode="RGBA"),),
        negative_prompt="blur",
        max_sequence_length=77,
        output_format=ImageFormat.WEBP,
        output_quality=80,
    )
    resolved = resolve_request(request, BASE)
    params = JobParams.from_resolved(resolved)
    assert params == replace(PARAMS, reference_sizes=((64, 80),), loras=())  # width 100 -> 96: resolved
    stored = resolved.stored
    assert params.to_request(stored.reference_images) == stored


def test_the_stored_request_restores_the_same_resolution_without_preparing_again() -> None:
    references = (random_image(72, 80, seed=1, mode="RGBA"), random_image(1500, 900, seed=2))
    for spec in (BASE, DISTILLED):
        resolved = resolve_request(GenerateRequest(prompt="x", reference_images=references), spec)
        params = JobParams.from_resolved(resolved)
        prepared = [reference.image for reference in resolved.references]
        assert [image.size for image in prepared] == list(params.reference_sizes)
        reloaded = [Image.fromarray(np.asarray(image)) for image in prepared]  # as a PNG reads back
        restored = restore_request(params.to_request(reloaded), spec)
        assert (restored.batch_key, restored.seeds, restored.guidance) == (
            resolved.batch_key,
            resolved.seeds,
            resolved.guidance,
        )
        assert (restored.steps, restored.use_cfg) == (resolved.steps, resolved.use_cfg)
        for again, first in zip(restored.references, resolved.references, strict=True):
            assert np.array_equal(again.pixels.numpy(), first.pixels.numpy())


def test_an_edit_keeps_its_mask_as_the_last_file() -> None:
    mask = Image.new("L", (100, 70), 0)
    mask.paste(255, (10, 10, 60, 50))
    request = GenerateRequest(
        prompt="x",
        reference_images=(random_image(100, 70, 1), random_image(80, 80, 2)),
        mask=mask,
        strength=0.7,
    )
    resolved = resolve_request(request, DISTILLED)
    params = from_json(JobParams, to_json(JobParams.from_resolved(resolved)))
    assert params.masked and params.strength == 0.7 and params.mask is None
    files = stored_images(resolved.stored)
    assert [image.mode for image in files] == ["RGB", "RGB", "L"] and files[2].size == (96, 64)
    reloaded = [Image.fromarray(np.asarray(image)) for image in files]  # as a PNG reads back
    restored = restore_request(params.to_request(reloaded), DISTILLED)
    assert restored.batch_key == resolved.batch_key
    assert restored.edit is not None and resolved.edit is not None and restored.edit.strength == 0.7
    assert torch.equal(restored.edit.mask, resolved.edit.mask)  # type: ignore[arg-type]
    for again, first in zip(restored.references, resolved.references, strict=True):
        assert np.array_equal(again.pixels.numpy(), first.pixels.numpy())


def test_from_result_records_media_names_in_image_order() -> None:
    image = Image.new("RGB", (96, 64))
    generated = GenerateResult(
        images=(GeneratedImage(image, 7), GeneratedImage(image, 8)),
        width=96,
        height=64,
        steps=3,
        guidance=2.5,
        prompt_tokens=12,
    )
    assert JobResult.from_result(generated, ["a.webp", "b.webp"]) == RESULT
    assert RESULT.seeds == [7, 8]
