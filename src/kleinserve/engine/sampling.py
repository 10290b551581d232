"""Schedule and the denoising loop (rectified flow, Euler), as free functions over tensors.

The schedule is diffusers' FlowMatchEulerDiscreteScheduler, configured from the checkpoint's
`scheduler_config.json`, given sigmas linspace(1, 1/N, N) and FLUX.2's empirical mu, which depends on the
number of target tokens only (reference tokens do not count). With `use_dynamic_shifting=False` in that config
mu would be silently ignored; FLUX.2 checkpoints set it True. Guarded by
tests/engine/test_sampling.py::test_schedule_matches_published_sigmas.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from kleinserve.errors import Cancelled
from kleinserve.types import CancelCheck


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift parameter for `image_seq_len` target tokens and `num_steps` steps (BFL get_schedule)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def make_scheduler(
    config: dict[str, Any], num_steps: int, image_seq_len: int
) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler (they are stateful) holding the N timesteps and N+1 sigmas (the last is 0)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu(image_seq_len, num_steps))
    scheduler.set_begin_index(0)
    return scheduler


# Velocity model: (noisy target tokens (B, N, C), timestep in [0, 1] of shape (B,)) -> velocity (B, N, C)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Called after each step with (step from 1, total steps, estimate of the clean latents (B, N, C), the step's
# seconds).
StepHook = Callable[[int, int, torch.Tensor, float], None]
# Inpainting's correction after each step: (step index into the schedule, x before the step, x after it) ->
# the x to go on with (engine/inpaint.py: KnownLatents.after_step).
AfterStep = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Real CFG: v = v_uncond + scale * (v_cond - v_uncond), both from one batched forward.

    `forward` takes the doubled batch [cond items | uncond items] and returns velocities in the same order.
    """

    forward: VelocityFn
    scale: float

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = self.forward(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)


def denoise(
    velocity: VelocityFn,
    noise: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    on_step: StepHook | None = None,
    cancelled: CancelCheck | None = None,
    first_step: int = 0,
    after_step: AfterStep | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """Integrate from packed noise (B, N, C) to clean packed latents (B, N, C), over the schedule's timesteps
    from `first_step` on (image-to-image starts later: diffusers' set_begin_index), `after_step` correcting x
    after each step (inpainting). With `steps`, stop after that many and return the partly denoised x: the
    toy's training starts some batches there (toy/fit.sampled_input); `scheduler` is used up either way.

    The model gets t = sigma (scheduler timesteps / 1000, as diffusers passes them). Cancellation is checked
    before every step, so a cancelled request stops within one step. The clean estimate handed to `on_step`
    is x0 = x_t - sigma * v (rectified flow: x_t = (1 - sigma) x0 + sigma noise, v = noise - x0), with the
    step's own seconds (model call and scheduler step).
    """
    x = noise
    scheduler.set_begin_index(first_step)
    timesteps = scheduler.timesteps[first_step:]
    total = len(timesteps)
    if steps is not None:
        timesteps = timesteps[:steps]
    for offset, timestep in enumerate(timesteps):
        if cancelled is not None and cancelled():
            raise Cancelled(f"cancelled before step {offset + 1} of {total}")
        start = time.perf_counter()
        index = first_step + offset
        t = timestep.expand(x.shape[0]).to(x.dtype) / 1000
        v = velocity(x, t)
        sigma = scheduler.sigmas[index]
        if on_step is not None:
            estimate = x.float() - sigma * v.float()
        stepped = scheduler.step(v, timestep, x, return_dict=False)[0]
        x = stepped if after_step is None else after_step(index, x, stepped)
        if on_step is not None:
            on_step(offset + 1, total, estimate, time.perf_counter() - start)
    return x
