"""The schedule and latent layouts, checked against published values and diffusers' own helpers."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline

from kleinserve.engine import latents as L
from kleinserve.engine.sampling import compute_empirical_mu, make_scheduler
from kleinserve.engine.tiny import SCHEDULER_CONFIG


@pytest.mark.parametrize(
    ("side", "mu", "sigmas"),
    [
        (64, 1.9452, [1, 0.9545, 0.8749, 0.6999, 0]),
        (512, 2.0307, [1, 0.9581, 0.8840, 0.7175, 0]),
        (1024, 2.2912, [1, 0.9674, 0.9081, 0.7672, 0]),
        (1536, 2.0167, [1, 0.9575, 0.8825, 0.7146, 0]),  # > 4300 tokens: the other branch
    ],
)
def test_schedule_matches_published_sigmas(side, mu, sigmas):
    tokens = (side // 16) ** 2
    assert compute_empirical_mu(tokens, 4) == pytest.approx(mu, abs=1e-4)
    scheduler = make_scheduler(SCHEDULER_CONFIG, 4, tokens)
    assert scheduler.sigmas.tolist() == pytest.approx(sigmas, abs=1e-4)


def test_layouts_match_diffusers_helpers():
    latents = torch.randn(2, 4, 6, 10)
    assert torch.equal(L.patchify(latents), Flux2KleinPipeline._patchify_latents(latents))
    assert torch.equal(L.unpatchify(L.patchify(latents)), latents)
    packed = L.pack(L.patchify(latents))
    assert torch.equal(packed, Flux2KleinPipeline._pack_latents(L.patchify(latents)))
    assert torch.equal(L.unpack(packed, 3, 5), L.patchify(latents))
    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 16, 3, 5))[0]
    assert torch.equal(L.image_ids(3, 5), ids)


def test_reference_ids_step_t_by_ten():
    ids = L.reference_ids([(2, 3), (1, 2)])
    assert ids[:, 0].tolist() == [10] * 6 + [20] * 2
    expected = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 8, 2, 3), torch.zeros(1, 8, 1, 2)])[0]
    assert torch.equal(ids, expected)


def test_noise_is_per_seed_cpu_generator():
    noise = L.draw_noise([5, 6], 16, 4, 4)
    alone = torch.randn((1, 16, 4, 4), generator=torch.Generator("cpu").manual_seed(6))
    assert torch.equal(noise[1:], alone)
