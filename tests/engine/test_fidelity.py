"""Pixels equal diffusers' Flux2KleinPipeline (CPU generator, same seed) within 1/255.

Each case notes what it catches. Two steps catch multi-step state bugs; odd reference sizes catch the crop and
the position ids; non-square outputs catch h/w swaps in packing and ids.
"""

from __future__ import annotations

from diffusers import Flux2KleinPipeline

from kleinserve.engine import load_pipeline
from kleinserve.types import GenerateRequest
from tests.conftest import max_difference, random_image, reference_image


def _check(pipeline, reference, request: GenerateRequest) -> None:
    result = pipeline.generate(request)
    expected = reference_image(
        reference,
        request.prompt,
        request.seed,
        result.width,
        result.height,
        result.steps,
        guidance=result.guidance,
        images=list(request.reference_images) or None,
    )
    assert result.images[0].image.size == expected.size
    assert max_difference(result.images[0].image, expected) <= 1


def test_text_to_image(pipeline, reference_pipeline):
    # catches: schedule (mu, shift), noise generator and layout, text embeddings, VAE de-normalisation
    _check(
        pipeline,
        reference_pipeline,
        GenerateRequest(prompt="a red fox in the snow", width=64, height=64, seed=3),
    )


def test_non_square_two_steps(pipeline, reference_pipeline):
    # catches: h/w swaps in pack/unpack and position ids; state carried across steps
    request = GenerateRequest(prompt="a lighthouse", width=112, height=64, steps=2, seed=11)
    _check(pipeline, reference_pipeline, request)
    tall = GenerateRequest(prompt="a lighthouse", width=64, height=96, seed=12)
    _check(pipeline, reference_pipeline, tall)


def test_one_reference_of_odd_size(pipeline, reference_pipeline):
    # catches: centre crop to /16 (100x70 -> 96x64), reference t offset 10, output size = first reference
    reference = random_image(100, 70, seed=1)
    request = GenerateRequest(prompt="make it blue", seed=5, reference_images=(reference,))
    assert pipeline.resolve(request).width == 96 and pipeline.resolve(request).height == 64
    _check(pipeline, reference_pipeline, request)


def test_three_references_of_different_sizes(pipeline, reference_pipeline):
    # catches: per-reference t offsets 10, 20, 30; sequence order [target | ref1 | ref2 | ref3]; per-ref grids
    references = (random_image(100, 70, 1), random_image(81, 90, 2), random_image(130, 64, 3))
    request = GenerateRequest(prompt="combine them", width=80, height=64, seed=9, reference_images=references)
    _check(pipeline, reference_pipeline, request)


def test_large_reference_is_resized_to_one_megapixel(pipeline, reference_pipeline):
    # catches: the 1024*1024-pixel cap (LANCZOS, int truncation) before the crop:
    # 1100x1000 -> 1073x976 -> 1072x976
    reference = random_image(1100, 1000, seed=4)
    request = GenerateRequest(prompt="zoom", width=64, height=64, seed=2, reference_images=(reference,))
    assert [r.size for r in pipeline.resolve(request).references] == [(1072, 976)]
    _check(pipeline, reference_pipeline, request)


def test_base_variant_with_cfg(tiny_base_dir):
    # catches: real CFG (uncond + g * (cond - uncond)) with the empty negative prompt, and the base defaults
    pipeline = load_pipeline(str(tiny_base_dir), dtype="float32")
    reference = Flux2KleinPipeline.from_pretrained(tiny_base_dir)
    assert pipeline.spec.uses_cfg and pipeline.spec.default_guidance == 4.0
    _check(pipeline, reference, GenerateRequest(prompt="a castle", width=64, height=80, steps=3, seed=4))
    _check(
        pipeline,
        reference,
        GenerateRequest(prompt="a castle", width=64, height=64, steps=2, guidance=2.5, seed=4),
    )
