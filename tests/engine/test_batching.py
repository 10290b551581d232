"""A seed means one image, alone or in a batch; image i of a request with seed s is seed s + i's image."""

from __future__ import annotations

import pytest

from kleinserve.errors import InvalidInput
from kleinserve.types import GenerateRequest
from tests.conftest import max_difference, random_image


def test_n_images_use_consecutive_seeds(pipeline):
    result = pipeline.generate(GenerateRequest(prompt="a boat", width=64, height=64, seed=20, num_images=3))
    assert [image.seed for image in result.images] == [20, 21, 22]
    alone = pipeline.generate(GenerateRequest(prompt="a boat", width=64, height=64, seed=22))
    assert max_difference(result.images[2].image, alone.images[0].image) <= 1
    assert max_difference(result.images[0].image, result.images[1].image) > 10  # different seeds differ


def test_batch_of_different_prompts_and_references_equals_each_alone(pipeline):
    # Same reference geometry (96x64 after the crop) but different reference pixels and prompts.
    requests = [
        GenerateRequest(prompt="a cat", seed=1, reference_images=(random_image(100, 70, 1),)),
        GenerateRequest(
            prompt="a dog on a hill", seed=7, num_images=2, reference_images=(random_image(96, 64, 2),)
        ),
    ]
    batched = pipeline.generate_batch([pipeline.resolve(request) for request in requests])
    assert [len(r.images) for r in batched] == [1, 2]
    for request, result in zip(requests, batched, strict=True):
        alone = pipeline.generate(request)
        for together, single in zip(result.images, alone.images, strict=True):
            assert together.seed == single.seed
            assert max_difference(together.image, single.image) <= 1


def test_incompatible_requests_are_refused(pipeline):
    requests = [
        GenerateRequest(prompt="a", width=64, height=64, seed=1),
        GenerateRequest(prompt="b", width=80, height=64, seed=1),
    ]
    with pytest.raises(InvalidInput, match="share"):
        pipeline.generate_batch([pipeline.resolve(request) for request in requests])
    assert pipeline.resolve(requests[0]).batch_key != pipeline.resolve(requests[1]).batch_key


def test_progress_is_reported_per_step(pipeline):
    seen = []
    pipeline.generate(GenerateRequest(prompt="x", width=64, height=64, seed=1, steps=3), on_step=seen.append)
    assert [(p.step, p.total_steps) for p in seen] == [(1, 3), (2, 3), (3, 3)]


def test_cancellation_stops_between_steps(pipeline):
    from kleinserve.errors import Cancelled

    steps = []

    def cancel_after_two() -> bool:
        return len(steps) >= 2

    with pytest.raises(Cancelled, match="step 3 of 4"):
        pipeline.generate(
            GenerateRequest(prompt="x", width=64, height=64, seed=1),
            on_step=steps.append,
            cancelled=cancel_after_two,
        )
    assert len(steps) == 2


def test_preview_decodes_the_clean_estimate(pipeline):
    # At the last step x0 = x - sigma * v is exactly the Euler step to sigma 0: the preview is the result.
    previews = {}
    request = GenerateRequest(prompt="a tree", width=64, height=64, seed=4, num_images=2)

    def keep(progress):
        previews[progress.step] = progress.preview()

    result = pipeline.generate(request, on_step=keep)
    assert sorted(previews) == [1, 2, 3, 4] and all(len(images) == 2 for images in previews.values())
    for image, preview in zip(result.images, previews[4], strict=True):
        assert max_difference(image.image, preview) <= 1
    assert max_difference(previews[1][0], result.images[0].image) > 5
