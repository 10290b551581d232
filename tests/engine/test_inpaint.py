"""Inpainting and image-to-image (issue 18): pixels equal diffusers' Flux2KleinInpaintPipeline (fp32, CPU
generator, same seed) within 1/255, and a batch of edits equals each edit alone.

Each case notes what it catches. The reference pipeline gets the mask as diffusers' convention has it (white
repaints), the same "L" image the request carries; without a mask, an all-white one (its mask is required).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinInpaintPipeline
from PIL import Image, ImageDraw

from kleinserve.engine import Pipeline
from kleinserve.errors import InvalidInput
from kleinserve.types import GenerateRequest
from tests.conftest import max_difference, random_image


@pytest.fixture(scope="module")
def inpaint_reference(tiny_dir: Path) -> Flux2KleinInpaintPipeline:
    return Flux2KleinInpaintPipeline.from_pretrained(tiny_dir)


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """An "L" mask of `width` x `height`: 255 (repaint) inside `box` (left, top, right, bottom), 0 outside."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def expected(reference: Flux2KleinInpaintPipeline, request: GenerateRequest, steps: int) -> Image.Image:
    image, *others = request.reference_images
    mask = request.mask if request.mask is not None else Image.new("L", image.size, 255)
    return reference(
        prompt=request.prompt,
        image=image,
        mask_image=mask,
        image_reference=(others if len(others) > 1 else others[0]) if others else None,
        strength=1.0 if request.strength is None else request.strength,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(request.seed or 0),
    ).images[0]


def check(pipeline: Pipeline, reference: Flux2KleinInpaintPipeline, request: GenerateRequest) -> Image.Image:
    made = pipeline.generate(request)
    wanted = expected(reference, request, made.steps)
    assert made.images[0].image.size == wanted.size
    assert max_difference(made.images[0].image, wanted) <= 1
    return made.images[0].image


def test_mask_with_strength_one(pipeline: Pipeline, inpaint_reference: Flux2KleinInpaintPipeline) -> None:
    # catches: the mask processor (resize, binarise), its bilinear token grid, the known region put back after
    # each step (noised to the next sigma, clean after the last), the edited image as reference 0; odd size:
    # the image is resized (not cropped) to multiples of 16 (100x70 -> 96x64)
    image = random_image(100, 70, seed=1)
    request = GenerateRequest(
        prompt="a blue circle", seed=3, reference_images=(image,), mask=box_mask(100, 70, (30, 20, 70, 55))
    )
    resolved = pipeline.resolve(request)
    assert (resolved.width, resolved.height) == (96, 64)
    check(pipeline, inpaint_reference, request)


def test_strength_without_mask(pipeline: Pipeline, inpaint_reference: Flux2KleinInpaintPipeline) -> None:
    # catches: the start step from strength (0.6 of 4 steps: int(4 - 2.4) = 1, three steps run) and the start
    # latents sigma * noise + (1 - sigma) * x0 at that step's sigma
    image = random_image(64, 80, 2)
    request = GenerateRequest(prompt="autumn", seed=8, reference_images=(image,), strength=0.6)
    resolved = pipeline.resolve(request)
    assert resolved.edit is not None and resolved.edit.start_step(resolved.steps) == 1
    steps: list[int] = []
    pipeline.generate(request, on_step=lambda progress: steps.append(progress.total_steps))
    assert steps == [3, 3, 3]
    check(pipeline, inpaint_reference, request)


def test_mask_and_two_references_of_odd_sizes(
    pipeline: Pipeline, inpaint_reference: Flux2KleinInpaintPipeline
) -> None:
    # catches: the other references resized and centre-cropped to the first one's floored size (90x70 and
    # 130x75 -> 80x64), their t offsets 20 and 30 after the edited image's 10, strength below 1 with a mask
    image = random_image(81, 66, seed=4)
    request = GenerateRequest(
        prompt="a star here",
        seed=6,
        steps=2,
        reference_images=(image, random_image(90, 70, 5), random_image(130, 75, 6)),
        mask=box_mask(81, 66, (0, 0, 40, 66)),
        strength=0.8,
    )
    assert [r.size for r in pipeline.resolve(request).references] == [(80, 64), (80, 64), (80, 64)]
    check(pipeline, inpaint_reference, request)


def test_a_batch_of_edits_equals_each_alone(pipeline: Pipeline) -> None:
    # catches: per-image masks, strengths and start steps in one batch (a row that has not started yet keeps
    # its start latents), each image's own noise
    image = random_image(64, 64, seed=7)
    first = GenerateRequest(
        prompt="a red square", seed=1, reference_images=(image,), mask=box_mask(64, 64, (8, 8, 40, 40))
    )
    second = GenerateRequest(
        prompt="a green ring", seed=2, reference_images=(random_image(64, 64, 8),), strength=0.5, num_images=2
    )
    resolved = [pipeline.resolve(first), pipeline.resolve(second)]
    assert resolved[0].batch_key == resolved[1].batch_key
    together = pipeline.generate_batch(resolved)
    for request, result in zip((first, second), together, strict=True):
        alone = pipeline.generate(request)
        for a, b in zip(alone.images, result.images, strict=True):
            assert max_difference(a.image, b.image) <= 1
    plain = pipeline.resolve(GenerateRequest(prompt="x", seed=1, reference_images=(image,)))
    assert plain.batch_key != resolved[0].batch_key  # an edit starts from its image


def test_a_stored_edit_restores_the_same_image(pipeline: Pipeline) -> None:
    # catches: what a job stores (prepared images, the 0/255 mask at the output size) giving the same pixels
    request = GenerateRequest(
        prompt="moon",
        seed=4,
        reference_images=(random_image(70, 90, 9),),
        mask=box_mask(70, 90, (10, 10, 50, 60)),
        strength=0.7,
    )
    resolved = pipeline.resolve(request)
    restored = pipeline.restore(resolved.stored)
    assert restored.batch_key == resolved.batch_key
    (direct,) = pipeline.generate_batch([resolved])
    (again,) = pipeline.generate_batch([restored])
    assert max_difference(direct.images[0].image, again.images[0].image) == 0


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"mask": box_mask(64, 64, (0, 0, 9, 9))}, "mask", "needs an image"),
        ({"strength": 0.5}, "strength", "needs an image"),
        ({"images": 1, "mask": box_mask(65, 64, (0, 0, 9, 9))}, "mask", "exactly the first image's size"),
        ({"images": 1, "mask": Image.new("L", (64, 64), 127)}, "mask", "nothing to repaint"),
        ({"images": 1, "strength": 0.0}, "strength", "0 < s <= 1"),
        ({"images": 1, "strength": 1.5}, "strength", "0 < s <= 1"),
        ({"images": 1, "strength": float("nan")}, "strength", "0 < s <= 1"),
        ({"images": 1, "strength": 0.5, "width": 128}, "width", "64x64 or no size"),
    ],
)
def test_bad_edits_name_the_parameter(
    pipeline: Pipeline, fields: dict[str, object], param: str, words: str
) -> None:
    count = fields.pop("images", 0)
    references = tuple(random_image(64, 64, seed=i) for i in range(int(count)))  # type: ignore[call-overload]
    with pytest.raises(InvalidInput) as refused:
        pipeline.resolve(GenerateRequest(prompt="x", reference_images=references, **fields))  # type: ignore[arg-type]
    assert refused.value.param == param and words in refused.value.message
