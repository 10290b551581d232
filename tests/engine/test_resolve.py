"""Resolution: the variant's policy (ModelSpec) applied to requests, on specs alone (no weights)."""

from __future__ import annotations

import numpy as np
import pytest

from kleinserve.engine.resolve import resolve_request
from kleinserve.engine.spec import MAX_GUIDANCE, MAX_STEPS, ModelSpec
from kleinserve.errors import InvalidInput
from kleinserve.types import MAX_SEED, GenerateRequest
from tests.conftest import random_image

DISTILLED = ModelSpec("distilled", distilled=True, default_steps=4, default_guidance=1.0, parameters=0)
BASE = ModelSpec("base", distilled=False, default_steps=50, default_guidance=4.0, parameters=0)


def test_the_policy_follows_from_one_fact() -> None:
    assert (DISTILLED.steps_fixed, DISTILLED.guidance_fixed, DISTILLED.uses_cfg) == (True, True, False)
    assert (BASE.steps_fixed, BASE.guidance_fixed, BASE.uses_cfg) == (False, False, True)
    assert BASE.steps_range == (1, MAX_STEPS) and BASE.guidance_range == (0.0, MAX_GUIDANCE)


def test_distilled_ignores_guidance_always_and_steps_when_the_request_lets_the_variant_fix_them() -> None:
    asked = GenerateRequest(prompt="x", steps=2, guidance=2.5, seed=1)
    free = resolve_request(asked, DISTILLED)
    assert (free.steps, free.guidance, free.use_cfg) == (2, 1.0, False)
    assert (free.request.steps, free.request.guidance) == (2, None)  # what was honoured
    fixed = resolve_request(
        GenerateRequest(prompt="x", steps=2, guidance=2.5, fixed_by_variant=True), DISTILLED
    )
    assert (fixed.steps, fixed.guidance) == (4, 1.0)
    assert (fixed.request.steps, fixed.request.guidance) == (None, None)
    # A value the variant ignores is not checked either, as the hosted APIs do not check it.
    ignored = GenerateRequest(prompt="x", steps=999, guidance=99.0, fixed_by_variant=True)
    assert resolve_request(ignored, DISTILLED).steps == 4


@pytest.mark.parametrize("fixed_by_variant", [False, True])
def test_base_variant_honours_steps_and_guidance(fixed_by_variant: bool) -> None:
    request = GenerateRequest(prompt="x", steps=2, guidance=2.5, fixed_by_variant=fixed_by_variant)
    resolved = resolve_request(request, BASE)
    assert (resolved.steps, resolved.guidance, resolved.use_cfg) == (2, 2.5, True)
    assert (resolved.request.steps, resolved.request.guidance) == (2, 2.5)
    defaults = resolve_request(GenerateRequest(prompt="x", fixed_by_variant=fixed_by_variant), BASE)
    assert (defaults.steps, defaults.guidance) == (50, 4.0)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"steps": MAX_STEPS + 1}, "steps"),
        ({"steps": 0}, "steps"),
        ({"guidance": MAX_GUIDANCE + 1}, "guidance"),
    ],
)
def test_out_of_range_values_name_their_parameter(fields: dict[str, float], param: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        resolve_request(GenerateRequest(prompt="x", **fields), BASE)  # type: ignore[arg-type]
    assert raised.value.param == param


def test_one_seed_bound_keeps_every_image_seed_in_int64() -> None:
    highest = resolve_request(GenerateRequest(prompt="x", seed=MAX_SEED, num_images=4), DISTILLED)
    assert highest.seeds[-1] < 2**63
    with pytest.raises(InvalidInput) as raised:
        resolve_request(GenerateRequest(prompt="x", seed=MAX_SEED + 1), DISTILLED)
    assert raised.value.param == "seed"


def test_the_honoured_request_holds_rgb_references_and_resolves_again_the_same() -> None:
    reference = random_image(100, 70, seed=2, mode="RGBA")
    resolved = resolve_request(GenerateRequest(prompt="x", seed=3, reference_images=(reference,)), DISTILLED)
    [source] = resolved.request.reference_images
    assert source.mode == "RGB" and source.size == reference.size
    again = resolve_request(resolved.request, DISTILLED)
    assert (again.batch_key, again.seeds) == (resolved.batch_key, resolved.seeds)
    assert np.array_equal(again.references[0].pixels.numpy(), resolved.references[0].pixels.numpy())
