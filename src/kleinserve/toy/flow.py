"""The sequence the toy's transformer trains on, built as inference builds it: the engine's Pipeline around
the in-memory modules, cached scene latents, the velocity call with references, 4-step sampling, and the clean
latents of inpainting examples (train.py's stages use these).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from diffusers import Flux2KleinPipeline

from kleinserve.engine import latents as L
from kleinserve.engine.components import ModelComponents
from kleinserve.engine.inpaint import MASK_THRESHOLD, EditPlan, KnownLatents
from kleinserve.engine.pipeline import Pipeline
from kleinserve.engine.precision import Placement
from kleinserve.engine.references import encode_references, prepare_reference, vae_latents
from kleinserve.engine.sampling import VelocityFn, denoise, make_scheduler
from kleinserve.engine.spec import SIZE_MULTIPLE, detect_spec
from kleinserve.toy import scenes
from kleinserve.toy.model import TEXT_LENGTH


def training_pipeline(pipeline: Flux2KleinPipeline) -> Pipeline:
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


def velocity_fn(
    engine: Pipeline, cache: LatentCache, examples: list[scenes.Example], side: int
) -> VelocityFn:
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
    """VAE latents (B, C, side/8, side/8) of klein's 4-step sampling for the examples, from fresh noise; an
    inpainting batch's as the engine's inpainting makes them (the kept region put back after every step)."""
    grid = side // SIZE_MULTIPLE
    channels = engine.components.transformer.config.in_channels
    noise = torch.randn((len(examples), grid * grid, channels), generator=generator)
    scheduler = make_scheduler(engine.components.scheduler_config, 4, grid * grid)
    known = None
    if examples[0].kind == "inpaint":
        known = known_latents(cache, examples, side, noise, scheduler.sigmas)
    velocity = velocity_fn(engine, cache, examples, side)
    packed = denoise(velocity, noise, scheduler, after_step=None if known is None else known.after_step)
    return vae_latents(packed, engine.components.vae, grid, grid)


def known_latents(
    cache: LatentCache, examples: list[scenes.Example], side: int, noise: torch.Tensor, sigmas: torch.Tensor
) -> KnownLatents:
    """What the engine's inpainting keeps of inpainting examples (scenes.inpaint_example) sampled from
    `noise` (B, N, C) over `sigmas` (the schedule's N + 1): the scene (the reference) outside the mask of
    the new shape's cell."""
    return KnownLatents(
        clean=cache.encode([example.references[0] for example in examples], side),
        noise=noise,
        mask=torch.cat([cell_tokens(example.target.shapes[-1].position, side) for example in examples]),
        starts=torch.zeros(len(examples), dtype=torch.long),
        sigmas=sigmas.float(),
    )


@functools.cache
def cell_tokens(position: str, side: int) -> torch.Tensor:
    """(1, N, 1) scenes.cell_mask of `position` at side x side on the token grid, 1 where the engine repaints,
    as the engine computes it (EditPlan.mask_tokens: bilinear, fractional on edges)."""
    pixels = torch.from_numpy(np.array(scenes.cell_mask(position, side)))  # a writable copy
    mask = (pixels >= MASK_THRESHOLD).float()[None, None]  # (1, 1, side, side)
    grid = side // SIZE_MULTIPLE
    tokens = EditPlan(strength=1.0, mask=mask, mask_image=None).mask_tokens(grid, grid)
    assert tokens is not None  # a plan with a mask has mask tokens
    return tokens


def painted_latents(cache: LatentCache, examples: list[scenes.Example], side: int) -> torch.Tensor:
    """(B, N, C) latents of inpainting examples (scenes.inpaint_example) as the toy is taught to paint
    them: the edited scene with the new shape in the square of every empty cell. The engine keeps only the
    mask's (train.train_inpaint says why). Built from one-shape scenes, which the cache keeps (encoding the
    many-shape scene took 8x longer than the training step)."""
    painted_scenes = []
    for example in examples:
        (before,), new = example.references, example.target.shapes[-1]
        painted = cache.encode([before], side)
        for position in scenes.POSITIONS:
            if position == before.shapes[0].position:
                continue
            mask = cell_tokens(position, side)
            moved = dataclasses.replace(new, position=position)
            alone = cache.encode([scenes.Scene((moved,), before.background)], side)
            painted = mask * alone + (1 - mask) * painted
        painted_scenes.append(painted)
    return torch.cat(painted_scenes)
