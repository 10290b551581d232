"""The transformer's training loop that stages 3 and 4b-7 share (`fit_transformer`, set by a `Fit`), and
the pieces every stage uses: batches of scenes.Example by kind, the optimiser step, the learning-rate cosine,
the foreground-weighted loss.

Rectified flow as klein samples it: x_t = (1 - s) x0 + s noise, target v = noise - x0, through the engine's
own text encoding, reference encoding and transformer call (flow.velocity_fn), so training sees exactly the
sequence inference builds. The squared error of tokens that show a shape weighs FOREGROUND_WEIGHT times more:
shapes are ~6 % of the tokens, and with uniform weights the model first learns backgrounds and draws shapes
late (measured: after 500 steps, a shape where the caption puts it 42 % of the time with uniform weights,
83 % with weight 5)."""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

from kleinserve.engine.inpaint import KnownLatents
from kleinserve.engine.sampling import denoise, make_scheduler
from kleinserve.engine.spec import SIZE_MULTIPLE
from kleinserve.toy import scenes
from kleinserve.toy.config import BATCH_KINDS, Log, TrainConfig
from kleinserve.toy.flow import LatentCache, known_latents, painted_latents, training_pipeline, velocity_fn

FOREGROUND_WEIGHT = 5.0  # loss weight of shape tokens (background tokens: 1)
FOREGROUND_DEVIATION = 0.3  # a token shows a shape when its mean |latent - image's median token| exceeds this

_MAKERS: dict[str, Callable[[random.Random], scenes.Example]] = {
    "text": scenes.text_example,
    "pair": functools.partial(scenes.text_example, shapes=2),
    "recolour": scenes.recolour_example,
    "background": scenes.background_example,
    "compose": scenes.compose_example,
    "inpaint": scenes.inpaint_example,
}


def random_kind(rng: random.Random, kinds: dict[str, float] = BATCH_KINDS) -> str:
    """One of `kinds` (kind -> share), drawn with its share."""
    return rng.choices(list(kinds), list(kinds.values()))[0]


def random_example(kind: str, rng: random.Random) -> scenes.Example:
    """An example of `kind`, one of the batch kinds (BATCH_KINDS and "inpaint")."""
    return _MAKERS[kind](rng)


def optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters: list, lr: float) -> None:
    """One step of every stage: set the learning rate, backpropagate, clip the gradient norm at 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def weighted_mean(error: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of `error`; `weights` broadcasts over it (size 1 along the channel dimension)."""
    return (error * weights).sum() / weights.expand_as(error).sum()


def cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at `step` of `total`: linear up over `warmup` steps, then a cosine from 1 down
    to 0.05."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def foreground_weights(x0: torch.Tensor) -> torch.Tensor:
    """(B, N, 1) loss weights: FOREGROUND_WEIGHT where a token differs from its image's median token."""
    deviation = (x0 - x0.median(dim=1, keepdim=True).values).abs().mean(dim=-1, keepdim=True)
    return 1 + (FOREGROUND_WEIGHT - 1) * (deviation > FOREGROUND_DEVIATION).float()


def sampled_input(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    done: int,
    known: KnownLatents | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, sigma (B,)): the engine's sampler (sampling.denoise) after its first `done` steps of a fresh
    `scheduler` from `noise` (B, N, C), without gradients; `done` < its step count, since the next step is
    the one trained. With `known` (an inpainting batch), each step is corrected as the engine's inpainting
    corrects it (KnownLatents.after_step)."""
    with torch.no_grad():
        after_step = None if known is None else known.after_step
        x = denoise(velocity, noise, scheduler, after_step=after_step, steps=done)
    return x, scheduler.sigmas[done].float().expand(len(x))


@dataclass(frozen=True)
class Fit:
    """One phase of transformer training (stages 3 and 4b-7): `steps` batches of `kinds` (kind -> share),
    `share_256` of them at 256 px, the learning rate `lr` on a cosine after `warmup`, every random choice from
    `config.seed + seed_offset`; `schedule_share` of the noised-x0 examples at a noise level of the 4-step
    schedule, the rest uniform in [0, 1); `sampled_share` of the batches start from the transformer's own
    sampling instead of a noised x0 (`sampled_input`); with a `pair_weight` the caption batches are
    shape_pairs, each pair at one noise level from one noise, `pair_weight` times the weighted squared
    difference of the two errors added to the loss (train.train_pairs says why)."""

    name: str
    kinds: dict[str, float]
    steps: int
    lr: float
    warmup: int
    seed_offset: int
    share_256: float
    schedule_share: float
    sampled_share: float = 0.0
    pair_weight: float = 0.0


def noise_levels(
    schedule: torch.Tensor, schedule_share: float, size: int, generator: torch.Generator
) -> torch.Tensor:
    """(size,) float noise levels to train at: with probability `schedule_share` one of the first four of
    `schedule` (klein's 4-step sigmas, N + 1 of them: never the final 0), else uniform in [0, 1)."""
    from_schedule = torch.rand(size, generator=generator) < schedule_share
    return torch.where(
        from_schedule,
        schedule[torch.randint(0, 4, (size,), generator=generator)].float(),
        torch.rand(size, generator=generator),
    )


def batch_noise(
    schedule: torch.Tensor, schedule_share: float, shape: torch.Size, paired: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (B,), noise `shape` (B, N, C)) for a batch: noise_levels and standard normal noise; `paired`:
    examples 2i and 2i + 1 (a scenes.shape_pairs pair) share both, so that their two errors differ only by
    what the shapes make them differ."""
    draws = shape[0] // 2 if paired else shape[0]
    sigma = noise_levels(schedule, schedule_share, draws, generator)
    noise = torch.randn((draws, *shape[1:]), generator=generator)
    if paired:
        sigma, noise = sigma.repeat_interleave(2), noise.repeat_interleave(2, dim=0)
    return sigma, noise


def flow_loss(
    predicted: torch.Tensor, target: torch.Tensor, x0: torch.Tensor, pair_weight: float = 0.0
) -> torch.Tensor:
    """The scalar training loss of a batch (B, N, C): the foreground-weighted mean squared error, plus, with
    a `pair_weight`, that times the weighted mean squared difference of the errors of examples 2i and 2i + 1
    (each token weighted as the more foreground of the two: a token where either pair's shape lies)."""
    weights = foreground_weights(x0)
    error = predicted - target
    loss = weighted_mean(error**2, weights)
    if pair_weight:
        pair_weights = torch.maximum(weights[0::2], weights[1::2])
        loss = loss + pair_weight * weighted_mean((error[0::2] - error[1::2]) ** 2, pair_weights)
    return loss


def fit_transformer(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log, fit: Fit) -> None:
    """Train `pipeline.transformer` in place as `fit` says; it ends holding the EMA weights. An "inpaint"
    batch is taught flow.painted_latents (train_inpaint says why)."""
    steps, lr = fit.steps, fit.lr
    engine = training_pipeline(pipeline)
    transformer = pipeline.transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    rng = random.Random(config.seed + fit.seed_offset)
    generator = torch.Generator().manual_seed(config.seed + fit.seed_offset)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)

    def schedule(side: int) -> FlowMatchEulerDiscreteScheduler:  # klein's 4 steps at side x side
        return make_scheduler(engine.components.scheduler_config, 4, (side // SIZE_MULTIPLE) ** 2)

    schedules = {side: schedule(side).sigmas for side in (128, 256)}
    cache = LatentCache(engine)
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        side = 256 if rng.random() < fit.share_256 else 128
        size = config.batch_256 if side == 256 else config.batch_128
        kind = random_kind(rng, fit.kinds)
        pair_weight = fit.pair_weight if kind == "text" else 0.0  # only caption batches come in pairs
        if pair_weight:
            examples = scenes.shape_pairs(rng, size)
        else:
            examples = [random_example(kind, rng) for _ in range(size)]
        if kind == "inpaint":
            x0 = painted_latents(cache, examples, side)
        else:
            x0 = cache.encode([e.target for e in examples], side)
        velocity = velocity_fn(engine, cache, examples, side)

        sigma, noise = batch_noise(schedules[side], fit.schedule_share, x0.shape, pair_weight > 0, generator)
        s = sigma.view(-1, 1, 1)
        x_t, target = (1 - s) * x0 + s * noise, noise - x0
        if fit.sampled_share and rng.random() < fit.sampled_share:
            done = int(torch.randint(1, 4, (), generator=generator))
            sampler = schedule(side)
            known = known_latents(cache, examples, side, noise, sampler.sigmas) if kind == "inpaint" else None
            x_t, sigma = sampled_input(velocity, noise, sampler, done, known)
            target = (x_t - x0) / sigma.view(-1, 1, 1)  # the velocity that lands on x0 in one step
        loss = flow_loss(velocity(x_t, sigma), target, x0, pair_weight)
        optimise(optimizer, loss, list(transformer.parameters()), lr * cosine(step, steps, fit.warmup))
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for averaged, current in zip(ema.parameters(), transformer.parameters(), strict=True):
                averaged.lerp_(current, 1 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"{fit.name} step {step}/{steps} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
    transformer.load_state_dict(ema.state_dict())
    transformer.eval().requires_grad_(False)
