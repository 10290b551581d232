"""`kleinserve toy train`: the VAE, the text encoder, then the transformer, on procedurally drawn scenes;
deterministic.

Stage 1 trains AutoencoderKLFlux2 (L1 + a light KL, decoding the posterior mean) on whole scenes drawn
at 64 px, then at 128 px (not crops: a crop of flat colour gives GroupNorm nothing to normalise), and sets its
BatchNorm statistics to those of the patchified latents, so normalised latents have unit variance.
Stage 2 teaches the text encoder to parse: linear heads on the last prompt token (always padding, so under
the causal mask it has seen the whole prompt) of the three-layer embedding the transformer reads classify each
attribute the prompt names (scenes.PARSE_FIELDS). The transformer then finds colour, shape, position and
background in one fixed place, one factor each, whatever the wording; with the raw word embeddings it had to
learn to bind each colour word to its noun by word order: on one evaluation set, 46 % of shapes placed right
after 2,000 transformer steps without this stage, 88 % after 500 with it.
Stage 3 trains Flux2Transformer2DModel with the rectified-flow objective (x_t = (1 - s) x0 + s noise, target
v = noise - x0) through the engine's own text encoding, reference encoding and transformer call
(`Pipeline.velocity`), so training sees exactly the sequence inference builds. Half the noise levels are the
four of klein's 4-step schedule at the batch's size, the other half uniform (other step counts still work).
The squared error of tokens that show a shape weighs FOREGROUND_WEIGHT times more: shapes are ~6 % of the
tokens, and with uniform weights the model first learns backgrounds and draws shapes late (measured: after
500 steps, a shape where the caption puts it 42 % of the time with uniform weights, 83 % with weight 5).

Same seed and thread count, same weights: every random choice comes from a seeded `random.Random` or
`torch.Generator`. Step counts are fixed, never time-based.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

from kleinserve.engine import latents as L
from kleinserve.engine.loading import ModelComponents
from kleinserve.engine.pipeline import Pipeline
from kleinserve.engine.precision import Placement
from kleinserve.engine.references import encode_references, prepare_reference, vae_latents
from kleinserve.engine.sampling import VelocityFn, denoise, make_scheduler
from kleinserve.engine.spec import SIZE_MULTIPLE, detect_spec
from kleinserve.toy import scenes
from kleinserve.toy.model import TEXT_DIM, TEXT_LENGTH, build_toy_pipeline, save_toy

Log = Callable[[str], None]
FOREGROUND_WEIGHT = 5.0  # loss weight of shape tokens (background tokens: 1)
FOREGROUND_DEVIATION = 0.3  # a token shows a shape when its mean |latent - image's median token| exceeds this


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_small_steps: int = 3400  # batches of 8 whole scenes drawn at 64 px
    vae_full_steps: int = 300  # batches of 4 whole scenes drawn at 128 px
    vae_lr: float = 3e-4  # 1e-3 diverges: flat colour fields make GroupNorm statistics nearly singular
    decoder_steps: int = 500  # batches of 8 scenes at 128 px or 2 at 256, decoder only, last
    decoder_lr: float = 2e-4
    decoder_sampled_share: float = 0.5  # fraction of decoder batches decoded from the transformer's samples
    text_steps: int = 1000  # batches of text_batch prompts of every kind
    text_batch: int = 64
    text_lr: float = 1e-3
    transformer_steps: int = 11000  # the committed weights: ~37 min at 0.20 s/step
    transformer_lr: float = 8e-4
    warmup_steps: int = 150
    ema_decay: float = 0.998
    batch_128: int = 8
    batch_256: int = 4
    share_256: float = 0.25  # fraction of transformer batches at 256 px
    schedule_share: float = 0.5  # fraction of noise levels taken from the 4-step schedule


# Transformer batch kinds and their shares; a batch holds one kind so that its reference geometry is shared.
BATCH_KINDS: dict[str, float] = {
    "text": 0.45,
    "pair": 0.15,
    "recolour": 0.2,
    "background": 0.08,
    "compose": 0.12,
}


_MAKERS: dict[str, Callable[[random.Random], scenes.Example]] = {
    "text": scenes.text_example,
    "pair": functools.partial(scenes.text_example, shapes=2),
    "recolour": scenes.recolour_example,
    "background": scenes.background_example,
    "compose": scenes.compose_example,
}


def random_kind(rng: random.Random) -> str:
    """One of BATCH_KINDS, drawn with its share."""
    return rng.choices(list(BATCH_KINDS), list(BATCH_KINDS.values()))[0]


def random_example(kind: str, rng: random.Random) -> scenes.Example:
    """An example of one of BATCH_KINDS."""
    return _MAKERS[kind](rng)


def to_pixels(images: list) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) in [-1, 1]."""
    return torch.stack([prepare_reference(image).pixels[0] for image in images])


def train(out: Path, config: TrainConfig = TrainConfig(), log: Log = print) -> Path:
    """Train the toy model and write it to `out` in the diffusers layout; returns `out`."""
    torch.manual_seed(config.seed)
    pipeline = build_toy_pipeline(config.seed)
    train_vae(pipeline, config, log)
    train_text_encoder(pipeline, config, log)
    train_transformer(pipeline, config, log)
    polish_decoder(pipeline, config, log)
    return save_toy(pipeline, out, dataclasses.asdict(config))


def _optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters: list, lr: float) -> None:
    """One step of every stage: set the learning rate, backpropagate, clip the gradient norm at 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def _weighted_mean(error: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of `error`; `weights` broadcasts over it (size 1 along the channel dimension)."""
    return (error * weights).sum() / weights.expand_as(error).sum()


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


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
        _optimise(optimizer, loss, list(vae.parameters()), config.vae_lr * _cosine(step, total, 200))
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step}/{total} l1 {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    vae.eval().requires_grad_(False)
    _set_latent_statistics(vae, random.Random(config.seed + 3))


def polish_decoder(pipeline: Flux2KleinPipeline, config: TrainConfig, log: Log) -> None:
    """Stage 4: train the VAE decoder alone, weighting shape pixels up, on two kinds of batches:
    - captioned scenes encoded by the (frozen) encoder: after stage 1 the decoder drew some shapes in the
      wrong named colour (red on gray came out orange: L1 over whole images is dominated by the background);
    - (`decoder_sampled_share` of the batches) latents sampled by the trained transformer with klein's
      4-step sampler for training captions and edits, decoded towards the scene the caption describes: the
      decoder learns to turn the transformer's slightly-off latents into flat colours.
    Measured with the same transformer (`kleinserve toy eval`, shape colour): 87.5 % after 600 steps on
    encoded scenes only (half of them busy, lr 1e-4), 91.7 % with half the batches sampled, 93.8 % with
    this recipe (encoded scenes all captioned, lr 2e-4; VAE round trip then names 100 % of colours right).
    The encoder stays frozen, so the latents the transformer was trained on are unchanged."""
    vae = pipeline.vae.train()
    engine = _training_pipeline(pipeline)
    cache = LatentCache(engine)
    rng = random.Random(config.seed + 5)
    generator = torch.Generator().manual_seed(config.seed + 5)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in decoder:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=config.decoder_lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(config.decoder_steps):
        if rng.random() < config.decoder_sampled_share:
            side = 256 if rng.random() < 0.5 else 128
            kind = random_kind(rng)
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
        loss = _weighted_mean((decoded - pixels).abs(), 1 + (FOREGROUND_WEIGHT - 1) * shape_pixels.float())
        _optimise(optimizer, loss, decoder, config.decoder_lr * _cosine(step, config.decoder_steps, 50))
        if step % 100 == 0 or step == config.decoder_steps - 1:
            elapsed = time.perf_counter() - start
            log(f"decoder step {step}/{config.decoder_steps} l1 {loss.item():.4f} ({elapsed:.0f} s)")
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
    engine = _training_pipeline(pipeline)
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
        lr = config.text_lr * _cosine(step, config.text_steps, 100)
        _optimise(optimizer, loss, list(encoder.parameters()), lr)
        if step % 100 == 0 or step == config.text_steps - 1:
            right = sum((logits[f].argmax(-1) == labels[f]).float().mean().item() for f in heads) / len(heads)
            elapsed = time.perf_counter() - start
            log(
                f"text step {step}/{config.text_steps} loss {loss.item():.4f} attributes right {right:.3f} "
                f"({elapsed:.0f} s)"
            )
    encoder.eval().requires_grad_(False)


def _training_pipeline(pipeline: Flux2KleinPipeline) -> Pipeline:
    """The engine's Pipeline around the in-memory modules (fp32 CPU, nothing packed: gradients must flow)."""
    transformer = pipeline.transformer
    parameters = sum(p.numel() for p in transformer.parameters())
    components = ModelComponents(
        # The toy's own prompt length (its model_index says so once saved): snapshots sample as served.
        spec=dataclasses.replace(
            detect_spec(dict(pipeline.config), dict(transformer.config), parameters, name="toy-training"),
            max_sequence_length=TEXT_LENGTH,
        ),
        tokenizer=pipeline.tokenizer,
        text_encoder=pipeline.text_encoder.model.requires_grad_(False),
        transformer=transformer,
        vae=pipeline.vae,
        scheduler_config=dict(pipeline.scheduler.config),
        placement=Placement(torch.device("cpu"), torch.float32),
    )
    return Pipeline(components)


class LatentCache:
    """Normalised packed latents of scenes, encoded as references are (each image alone, so a cached
    latent equals a fresh one). One-shape scenes are kept by (scene, side): there are only a few thousand of
    them, and encoding was a third of a training step."""

    def __init__(self, engine: Pipeline) -> None:
        self.engine = engine
        self.latents: dict[tuple[scenes.Scene, int], torch.Tensor] = {}

    def encode(self, scene_list: list[scenes.Scene], side: int) -> torch.Tensor:
        """(B, N, C) latents of the scenes drawn at side x side."""
        out = []
        for scene in scene_list:
            key = (scene, side)
            latent = self.latents.get(key)
            if latent is None:
                image = prepare_reference(scenes.render(scene, side))
                vae = self.engine.components.vae
                # .clone(): a normal tensor, since inference-mode tensors cannot enter autograd
                latent = encode_references([image], vae, torch.float32).clone()
                if len(scene.shapes) == 1:
                    self.latents[key] = latent
            out.append(latent)
        return torch.cat(out)


def _velocity(engine: Pipeline, cache: LatentCache, examples: list[scenes.Example], side: int) -> VelocityFn:
    """The transformer's velocity for the examples' prompts and references at side x side, as inference
    builds the sequence: [target | reference 1 | ...], reference ids offset as engine/latents.py says."""
    references = None
    grids: list[tuple[int, int]] = []
    if examples[0].references:
        count = len(examples[0].references)
        per_reference = [cache.encode([e.references[i] for e in examples], side) for i in range(count)]
        references = torch.cat(per_reference, dim=1)
        grids = [(side // SIZE_MULTIPLE,) * 2] * count
    with torch.inference_mode():
        embeds = engine.prompts.encode([e.prompt for e in examples], TEXT_LENGTH, torch.device("cpu"))
    grid = side // SIZE_MULTIPLE
    return functools.partial(
        engine.velocity,
        embeds=embeds.clone(),  # a normal tensor: inference-mode tensors cannot enter autograd
        reference_tokens=references,
        img_ids=torch.cat([L.image_ids(grid, grid), L.reference_ids(grids)]),
        txt_ids=L.text_ids(TEXT_LENGTH),
    )


def sample_latents(
    engine: Pipeline,
    cache: LatentCache,
    examples: list[scenes.Example],
    side: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """VAE latents (B, C, side/8, side/8) of klein's 4-step sampling for the examples, from fresh noise."""
    grid = side // SIZE_MULTIPLE
    channels = engine.components.transformer.config.in_channels
    noise = torch.randn((len(examples), grid * grid, channels), generator=generator)
    scheduler = make_scheduler(engine.components.scheduler_config, 4, grid * grid)
    packed = denoise(_velocity(engine, cache, examples, side), noise, scheduler)
    return vae_latents(packed, engine.components.vae, grid, grid)


def foreground_weights(x0: torch.Tensor) -> torch.Tensor:
    """(B, N, 1) loss weights: FOREGROUND_WEIGHT where a token differs from its image's median token."""
    deviation = (x0 - x0.median(dim=1, keepdim=True).values).abs().mean(dim=-1, keepdim=True)
    return 1 + (FOREGROUND_WEIGHT - 1) * (deviation > FOREGROUND_DEVIATION).float()


def train_transformer(
    pipeline: Flux2KleinPipeline,
    config: TrainConfig,
    log: Log,
) -> None:
    """Train `pipeline.transformer` in place; it ends holding the EMA weights."""
    engine = _training_pipeline(pipeline)
    transformer = pipeline.transformer.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    rng = random.Random(config.seed + 2)
    generator = torch.Generator().manual_seed(config.seed + 2)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.transformer_lr, weight_decay=0.01)
    schedules = {
        side: make_scheduler(engine.components.scheduler_config, 4, (side // SIZE_MULTIPLE) ** 2).sigmas[:4]
        for side in (128, 256)
    }
    cache = LatentCache(engine)
    start, running = time.perf_counter(), 0.0
    for step in range(config.transformer_steps):
        side = 256 if rng.random() < config.share_256 else 128
        size = config.batch_256 if side == 256 else config.batch_128
        kind = random_kind(rng)
        examples = [random_example(kind, rng) for _ in range(size)]
        x0 = cache.encode([e.target for e in examples], side)
        velocity = _velocity(engine, cache, examples, side)

        from_schedule = torch.rand(size, generator=generator) < config.schedule_share
        sigma = torch.where(
            from_schedule,
            schedules[side][torch.randint(0, 4, (size,), generator=generator)].float(),
            torch.rand(size, generator=generator),
        )
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        predicted = velocity(x_t, sigma)
        loss = _weighted_mean((predicted - (noise - x0)) ** 2, foreground_weights(x0))
        lr = config.transformer_lr * _cosine(step, config.transformer_steps, config.warmup_steps)
        _optimise(optimizer, loss, list(transformer.parameters()), lr)
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for averaged, current in zip(ema.parameters(), transformer.parameters(), strict=True):
                averaged.lerp_(current, 1 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == config.transformer_steps - 1:
            elapsed = time.perf_counter() - start
            log(f"transformer step {step}/{config.transformer_steps} loss {running:.4f} ({elapsed:.0f} s)")
    transformer.load_state_dict(ema.state_dict())
    transformer.eval().requires_grad_(False)
