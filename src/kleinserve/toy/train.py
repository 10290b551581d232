"""`kleinserve toy train`: the VAE, the text encoder, the transformer, the VAE decoder, the transformer again
on its own samples, masked edits, then mostly captions again, then captions in pairs of shapes, on
procedurally drawn scenes; deterministic.

Stage 1 trains AutoencoderKLFlux2 (L1 + a light KL, decoding the posterior mean) on whole scenes drawn
at 64 px, then at 128 px (not crops: a crop of flat colour gives GroupNorm nothing to normalise), and sets its
BatchNorm statistics to those of the patchified latents, so normalised latents have unit variance.
Stage 2 teaches the text encoder to parse: linear heads on the last prompt token (always padding, so under
the causal mask it has seen the whole prompt) of the three-layer embedding the transformer reads classify each
attribute the prompt names (scenes.PARSE_FIELDS). The transformer then finds colour, shape, position and
background in one fixed place, one factor each, whatever the wording; with the raw word embeddings it had to
learn to bind each colour word to its noun by word order: on one evaluation set, 46 % of shapes placed right
after 2,000 transformer steps without this stage, 88 % after 500 with it.
Stage 3 trains Flux2Transformer2DModel with the rectified-flow objective, shape tokens weighted up (fit.py
says how and why; stages 4b, 5 and 6 use the same loop). Half the noise levels are the four of klein's
4-step schedule at the batch's size, the other half uniform (other step counts still work).
Stage 4 polishes the VAE decoder (polish_decoder). Stage 4b refines the transformer on the inputs its own
sampler gives it (train_on_samples). Stage 5 fine-tunes the transformer, then the decoder, for masked edits
(scenes.inpaint_example: paint a named shape into the empty square a mask marks; train_inpaint), the
transformer at only the noise levels klein's 4-step sampler visits. Stage 6 fine-tunes the transformer on
batches mostly of captions (train_shapes), stage 7 the same with captions in pairs of shapes it confused
(train_pairs).

Same seed, thread count and CPU, same weights: every random choice comes from a seeded `random.Random` or
`torch.Generator`. Step counts are fixed, never time-based. Another CPU's kernels (or an earlier revision's
scenes) give other bytes: stages 1-2 re-run here (2-core AVX2 EPYC, 2026-12-05) left 1 of the VAE's 187
tensors equal to those of the committed stages 1-4 (trained 2026-11-22 by an earlier revision, on another
machine), so `--stage STAGE --from DIR` continues a model rather than re-making its earlier stages.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

from kleinserve.engine import latents as L
from kleinserve.engine.references import prepare_reference
from kleinserve.toy import scenes
from kleinserve.toy.config import BATCH_KINDS, INPAINT_WARMUP, SHAPES_KINDS, Log, TrainConfig
from kleinserve.toy.fit import (
    FOREGROUND_WEIGHT,
    Fit,
    cosine,
    fit_transformer,
    optimise,
    random_example,
    random_kind,
    weighted_mean,
)
from kleinserve.toy.flow import LatentCache, sample_latents, training_pipeline
from kleinserve.toy.model import TEXT_DIM, TEXT_LENGTH, build_toy_pipeline, save_toy


def to_pixels(images: list) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) in [-1, 1]."""
    return torch.stack([prepare_reference(image).pixels[0] for image in images])


def train(out: Path, config: TrainConfig = TrainConfig(), log: Log = print) -> Path:
    """Train the toy model and write it to `out` in the diffusers layout; returns `out`."""
    torch.manual_seed(config.seed)
    pipeline = build_toy_pipeline(config.seed)
    train_vae(pipeline, config, log)
    train_text_encoder(pipeline, config, log)
    for stage in STAGES:
        _STAGE_RUNNERS[stage](pipeline, config, log)
    return save_toy(pipeline, out, dataclasses.asdict(config))


# The stages a run can continue from (`continue_training`), each with the TrainConfig fields it and the stages
# after it read (the fields before belong to the stages already run: the VAE's and the text encoder's).
STAGES = ("transformer", "decoder", "refine", "inpaint", "shapes", "pairs")
_LATER_FIELDS = {
    "transformer": (
        "transformer_steps", "transformer_lr", "warmup_steps", "ema_decay", "batch_128", "batch_256",
        "share_256", "schedule_share",
    ),
    "decoder": ("decoder_steps", "decoder_lr", "decoder_sampled_share"),
    "refine": ("refine_steps", "refine_lr", "refine_share", "refine_share_256"),
    "inpaint": (
        "inpaint_steps", "inpaint_lr", "inpaint_share", "inpaint_schedule_share", "inpaint_decoder_steps",
        "inpaint_decoder_share",
    ),
    "shapes": ("shapes_steps", "shapes_lr", "shapes_share_256"),
    "pairs": ("pairs_steps", "pairs_lr", "pairs_share_256", "pairs_weight"),
}  # fmt: skip


def continue_training(
    source: Path, out: Path, config: TrainConfig = TrainConfig(), log: Log = print, stage: str = "inpaint"
) -> Path:
    """The stages from `stage` on (STAGES: 3, 4, 4b, 5, 6 or 7), run on a model `kleinserve toy train` wrote
    to `source` with 0 steps of those stages, written to `out`: the same bytes as the whole run of the merged
    configuration (same thread count). Settings of the stages before `stage` are `source`'s (its
    model_index keeps them), those of `stage` and after `config`'s. From "transformer" on, the transformer
    starts from the random weights of a whole run (build_toy_pipeline), so its size may differ from the
    one `source` was written with."""
    previous = json.loads((source / "model_index.json").read_text())["_kleinserve_training"]
    later = STAGES[STAGES.index(stage) :]
    # Each stage's step count is TrainConfig's "<stage>_steps"; .get: a model written before a stage existed
    # ran none of it.
    ran = [f"{name}_steps" for name in later if previous.get(f"{name}_steps")]
    if ran:
        raise ValueError(f"{source} already ran stage {stage} or later ({', '.join(ran)} not 0)")
    fields = {field for name in later for field in _LATER_FIELDS[name]}
    config = TrainConfig(
        **{**previous, **{f: v for f, v in dataclasses.asdict(config).items() if f in fields}}
    )
    trained = Flux2KleinPipeline.from_pretrained(source)
    if stage == "transformer":
        torch.manual_seed(config.seed)
        pipeline = build_toy_pipeline(config.seed)
        for name in ("vae", "text_encoder"):
            getattr(pipeline, name).load_state_dict(getattr(trained, name).state_dict())
            getattr(pipeline, name).eval().requires_grad_(False)
    else:
        pipeline = trained
    for name in later:
        _STAGE_RUNNERS[name](pipeline, config, log)
    return save_toy(pipeline, out, dataclasses.asdict(config))


def _captioned_scene_image(rng: random.Random, side: int):
    kind = rng.choice(list(BATCH_KINDS))
    example = random_example(kind, rng)
    scene = rng.choice([example.target, *example.references])
    return scenes.render(scene, side)


def train_vae(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    vae = pipeline.vae.train()
    rng = random.Random(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    total = config.vae_small_steps + config.vae_full_steps
    start = time.perf_counter()
    for step in range(total):
        small = step < config.vae_small_steps
        side, count = (64, 8) if small else (128, 4)
        pixels = to_pixels([scenes.busy_scene(rng, side) for _ in range(count)])
        posterior = vae.encode(pixels).latent_dist
        decoded = vae.decode(posterior.mode()).sample
        loss = F.l1_loss(decoded, pixels) + 1e-7 * posterior.kl().mean()
        optimise(optimizer, loss, list(vae.parameters()), config.vae_lr * cosine(step, total, 200))
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step}/{total} l1 {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    vae.eval().requires_grad_(False)
    _set_latent_statistics(vae, random.Random(config.seed + 3))


def polish_decoder(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Stage 4: the VAE decoder polished (_polish_decoder) on samples of BATCH_KINDS."""
    _polish_decoder(pipeline, config, log, BATCH_KINDS, config.decoder_steps, 5)


def _polish_decoder(
    pipeline: Flux2KleinPipeline,
    config: TrainConfig,
    log: Log,
    kinds: dict[str, float],
    steps: int,
    seed_offset: int,
) -> None:
    """Train the VAE decoder alone for `steps` batches, weighting shape pixels up, on two kinds of batches:
    - captioned scenes encoded by the (frozen) encoder: after stage 1 the decoder drew some shapes in the
      wrong named colour (red on gray came out orange: L1 over whole images is dominated by the background);
    - (`decoder_sampled_share` of the batches) latents sampled by the trained transformer with klein's
      4-step sampler for training examples of `kinds`, decoded towards the scene the prompt describes: the
      decoder learns to turn the transformer's slightly-off latents into flat colours.
    Measured with the same transformer (`kleinserve toy eval`, shape colour): 87.5 % after 600 steps on
    encoded scenes only (half of them busy, lr 1e-4), 91.7 % with half the batches sampled, 93.8 % with
    this recipe (encoded scenes all captioned, lr 2e-4; VAE round trip then names 100 % of colours right).
    The encoder stays frozen, so the latents the transformer was trained on are unchanged."""
    vae = pipeline.vae.train()
    engine = training_pipeline(pipeline)
    cache = LatentCache(engine)
    rng = random.Random(config.seed + seed_offset)
    generator = torch.Generator().manual_seed(config.seed + seed_offset)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in decoder:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=config.decoder_lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        if rng.random() < config.decoder_sampled_share:
            side = 256 if rng.random() < 0.5 else 128
            kind = random_kind(rng, kinds)
            examples = [random_example(kind, rng) for _ in range(2 if side == 256 else 8)]
            pixels = to_pixels([scenes.render(example.target, side) for example in examples])
            with torch.no_grad():
                latents = sample_latents(engine, cache, examples, side, generator)
        else:
            pixels = to_pixels([_captioned_scene_image(rng, 128) for _ in range(8)])
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents).sample
        border = torch.cat([pixels[..., 0, :], pixels[..., -1, :]], dim=-1).median(dim=-1).values
        shape_pixels = (pixels - border[..., None, None]).abs().sum(dim=1, keepdim=True) > 0.25
        loss = weighted_mean((decoded - pixels).abs(), 1 + (FOREGROUND_WEIGHT - 1) * shape_pixels.float())
        optimise(optimizer, loss, decoder, config.decoder_lr * cosine(step, steps, 50))
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} l1 {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    vae.eval().requires_grad_(False)


@torch.inference_mode()
def _set_latent_statistics(vae: AutoencoderKLFlux2, rng: random.Random, count: int = 96) -> None:
    """BatchNorm running mean/var := per-channel statistics of patchified latent means of `count` scenes."""
    latents = torch.cat(
        [
            L.patchify(vae.encode(to_pixels([_captioned_scene_image(rng, 128)])).latent_dist.mode())
            for _ in range(count)
        ]
    )
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


def _label(field: str, value: str | None) -> int:
    """Class index of `value` among scenes.PARSE_FIELDS[field]; the last class is "not said"."""
    values = scenes.PARSE_FIELDS[field]
    return len(values) if value is None else values.index(value)


def train_text_encoder(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Train `pipeline.text_encoder` in place to parse prompts into its last token (module docstring)."""
    engine = training_pipeline(pipeline)
    encoder = engine.components.text_encoder.train().requires_grad_(True)
    torch.manual_seed(config.seed + 4)
    heads = torch.nn.ModuleDict(
        {
            field: torch.nn.Linear(3 * TEXT_DIM, len(values) + 1)
            for field, values in scenes.PARSE_FIELDS.items()
        }
    )
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=config.text_lr)
    rng = random.Random(config.seed + 4)
    start = time.perf_counter()
    for step in range(config.text_steps):
        examples = [random_example(random_kind(rng), rng) for _ in range(config.text_batch)]
        last = engine.prompts.embed([e.prompt for e in examples], TEXT_LENGTH)[:, -1]
        said = [scenes.parse(e) for e in examples]
        logits = {field: head(last) for field, head in heads.items()}
        labels = {field: torch.tensor([_label(field, s[field]) for s in said]) for field in heads}
        loss = cast(torch.Tensor, sum(F.cross_entropy(logits[field], labels[field]) for field in heads))
        lr = config.text_lr * cosine(step, config.text_steps, 100)
        optimise(optimizer, loss, list(encoder.parameters()), lr)
        if step % 100 == 0 or step == config.text_steps - 1:
            right = sum((logits[f].argmax(-1) == labels[f]).float().mean().item() for f in heads) / len(heads)
            elapsed = time.perf_counter() - start
            log(
                f"text step {step}/{config.text_steps} loss {loss.item():.4f} attributes right {right:.3f} "
                f"({elapsed:.0f} s)"
            )
    encoder.eval().requires_grad_(False)


def train_transformer(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Stage 3: train `pipeline.transformer` in place on BATCH_KINDS; it ends holding the EMA weights."""
    steps, lr = config.transformer_steps, config.transformer_lr
    fit = Fit(
        "transformer", BATCH_KINDS, steps, lr, config.warmup_steps, 2, config.share_256, config.schedule_share
    )
    fit_transformer(pipeline, config, log, fit)


def train_on_samples(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Stage 4b: refine the trained transformer on the inputs its own 4-step sampler hands it. Stage 3 shows
    each noise level a noised true x0, but from the second step on the sampler's input holds the model's
    own earlier estimate instead, softer and a little off; the model had learnt to trust what the input shows,
    and its last step (sigma ~0.70, the picture) kept the soft shape. Here `refine_share` of the batches run
    1-3 sampler steps without gradients and are taught the velocity that lands on the true x0 from there
    (on a true x_t that velocity is stage 3's noise - x0). Measured over 72 held-out captions per side: at
    256 px shapes 16.7 -> 27.8 %, one clean shape 33.3 -> 54.2 %, at 128 px 40.3 -> 45.8 % and 62.5 -> 63.9 %
    (README, toy model; tests/toy/test_toy_model.py holds the committed weights to them)."""
    steps, lr, sides = config.refine_steps, config.refine_lr, config.refine_share_256
    levels, sampled = config.schedule_share, config.refine_share
    fit = Fit("refine", BATCH_KINDS, steps, lr, INPAINT_WARMUP, 7, sides, levels, sampled)
    fit_transformer(pipeline, config, log, fit)


def train_inpaint(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Stage 5: fine-tune the trained transformer for masked edits, then the VAE decoder on what it paints.

    Klein has no mask input: the engine puts the kept region back after every step (engine/inpaint.py), and
    at the toy's first noise levels (1.0, 0.95, 0.88) nothing in the input shows where the mask is. So an
    "inpaint" batch is taught to paint the new shape in the square of every empty cell (flow.painted_latents)
    at every noise level, and the engine keeps the mask's; taught the finished edit at any level, the toy
    painted faint, hazy shapes of a neighbouring hue (README, toy model, has the measurements). The other
    kinds keep their stage-3 shares, and `refine_share` of all batches start from the sampler's own steps
    (stage 4b's gains stay; an inpainting batch's steps corrected as the engine corrects them).

    Every example is at one of the four noise levels the 4-step sampler visits (`inpaint_schedule_share`):
    stage 3 spent half of its examples on uniform levels, and the x0 the transformer predicted from the
    caption alone (noise 1.0) stayed far off (README, toy model). Measured over 72 held-out captions a side,
    7,000 such steps at lr 3e-4 against 2,400 at lr 2e-4 with stage 3's levels: shapes 43.1 -> 58.3 % at
    128 px and 25.0 -> 40.3 % at 256 px, one clean shape 80.6 -> 84.7 % and 58.3 -> 63.9 %.

    The decoder then learns to decode what the fine-tuned transformer paints (`inpaint_decoder_steps`,
    `inpaint_decoder_share` of the sampled batches masked edits): with the new shape in the picture it had
    shifted the colour of the kept shape (a purple triangle on gray came out blue)."""
    steps, lr = config.inpaint_steps, config.inpaint_lr
    sides, levels, sampled = config.refine_share_256, config.inpaint_schedule_share, config.refine_share
    kinds = _with_inpaint(config.inpaint_share)
    fit = Fit("inpaint", kinds, steps, lr, INPAINT_WARMUP, 6, sides, levels, sampled)
    fit_transformer(pipeline, config, log, fit)
    if steps:  # without them nothing new is painted: the decoder stays as stage 4 left it
        kinds = _with_inpaint(config.inpaint_decoder_share)
        _polish_decoder(pipeline, config, log, kinds, config.inpaint_decoder_steps, 8)


def train_shapes(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Stage 6: fine-tune the transformer mostly on captions (SHAPES_KINDS), at the sampler's noise levels,
    `refine_share` of the batches from its own steps, as stage 5 does. In stage 5 captions are 29 % of the
    batches; a fine-tune of 3,000 steps on captions alone then lifted shapes (72 held-out captions a side)
    from 58.3 / 40.3 % to 59.7 / 61.1 % (128 / 256 px) and one clean shape from 84.7 / 63.9 % to
    91.7 / 88.9 %, but masked edits fell from 100 % to 58 % right colours and recolouring from 100 % to
    83 %: the other kinds keep a share here. With them, 3,000 steps gave 65.3 / 62.5 % shapes and
    90.3 / 86.1 % clean, 6,000 steps 73.6 / 70.8 % and 93.1 / 94.4 %."""
    steps, lr, sides = config.shapes_steps, config.shapes_lr, config.shapes_share_256
    levels = config.inpaint_schedule_share  # stage 5's noise levels (the sampler's), not a second setting
    fit = Fit("shapes", SHAPES_KINDS, steps, lr, INPAINT_WARMUP, 9, sides, levels, config.refine_share)
    fit_transformer(pipeline, config, log, fit)


def train_pairs(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Stage 7: stage 6 again (its batch kinds, noise levels and sampled share), its caption batches made of
    scenes.shape_pairs (a shape and one of its PARTNERS, the shapes it was drawn as, in the same caption,
    colour, place and background, from the same noise), `pairs_weight` times the squared difference of each
    pair's two errors added to the loss. After stage 6 the transformer drew a circle and a square almost
    alike: its clean estimate of a circle ~0.65 of the way from the square's latent to the circle's, which
    decodes as a square, and the plain loss moved it slowly (README, toy model, has the measurements).
    Measured over 72 held-out captions a side against stage 6's weights: shapes 73.6 / 70.8 -> 88.9 / 91.7 %
    (128 / 256 px; circles 5 / 1 -> 13 / 10 of 18 / 13, stars 5 / 3 -> 8 / 10 of 8 / 11), one clean shape
    93.1 / 94.4 -> 95.8 / 98.6 %, edits and masked edits unchanged. With 3,600 steps, half at 256 px: 86.1 /
    81.9 %; with 75 % at 256 px: 77.8 / 87.5 %."""
    steps, lr, sides = config.pairs_steps, config.pairs_lr, config.pairs_share_256
    levels, sampled = config.inpaint_schedule_share, config.refine_share
    fit = Fit(
        "pairs", SHAPES_KINDS, steps, lr, INPAINT_WARMUP, 11, sides, levels, sampled,
        pair_weight=config.pairs_weight,
    )  # fmt: skip
    fit_transformer(pipeline, config, log, fit)


def _with_inpaint(share: float) -> dict[str, float]:
    """Batch kinds: "inpaint" with `share`, the rest BATCH_KINDS in their proportions."""
    return {"inpaint": share} | {kind: (1 - share) * weight for kind, weight in BATCH_KINDS.items()}


_STAGE_RUNNERS: dict[str, Callable[[Flux2KleinPipeline, TrainConfig, Log], None]] = {
    "transformer": train_transformer,
    "decoder": polish_decoder,
    "refine": train_on_samples,
    "inpaint": train_inpaint,
    "shapes": train_shapes,
    "pairs": train_pairs,
}
