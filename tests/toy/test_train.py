"""`kleinserve toy train` is deterministic and writes a model the normal loader serves."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline

from kleinserve.cli import TOY_STAGES, main
from kleinserve.engine import load_pipeline
from kleinserve.engine.loading import TOY_DIR, read_config
from kleinserve.engine.sampling import make_scheduler
from kleinserve.toy import scenes
from kleinserve.toy.config import TrainConfig
from kleinserve.toy.fit import FOREGROUND_WEIGHT, batch_noise, flow_loss, noise_levels, sampled_input
from kleinserve.toy.flow import LatentCache, known_latents, training_pipeline, velocity_fn
from kleinserve.toy.scenes import PARTNERS, shape_pairs
from kleinserve.toy.train import STAGES, continue_training, train
from kleinserve.types import GenerateRequest

# A few steps of each stage: enough to exercise every batch kind's code path, small enough for CI.
SHORT = TrainConfig(
    vae_small_steps=2,
    vae_full_steps=1,
    text_steps=3,
    text_batch=8,
    transformer_steps=6,
    decoder_steps=2,
    warmup_steps=2,
    inpaint_steps=4,  # seed 0 draws inpaint and other batches
    inpaint_decoder_steps=2,
    shapes_steps=3,
    pairs_steps=3,  # seed 0 draws a caption batch: a batch of pairs
    refine_steps=2,
    refine_share=1.0,  # every batch from the sampler's own steps (the other kind is stage 3's)
)


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _weights(directory: Path) -> dict[str, bytes]:
    return {name: data for name, data in _files(directory).items() if name.endswith(".safetensors")}


def _training(directory: Path) -> dict:
    return json.loads((directory / "model_index.json").read_text())["_kleinserve_training"]


def test_same_seed_same_bytes_and_the_loader_serves_the_result(tmp_path: Path) -> None:
    first = train(tmp_path / "a", SHORT, log=lambda _: None)
    second = train(tmp_path / "b", SHORT, log=lambda _: None)
    other = train(tmp_path / "c", TrainConfig(**{**SHORT.__dict__, "seed": 1}), log=lambda _: None)
    assert _files(first) == _files(second)
    assert _training(first) == dataclasses.asdict(SHORT)
    for weights in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _files(first)[weights] != _files(other)[weights]
    pipeline = load_pipeline(str(first), dtype="float32")
    assert pipeline.spec.name == "flux-2-klein-toy"
    image = pipeline.generate(GenerateRequest(prompt="a red circle", width=64, height=64, seed=0)).images[0]
    assert image.image.size == (64, 64)


def test_the_inpaint_stage_alone_continues_a_model_to_the_same_bytes(tmp_path: Path) -> None:
    """`kleinserve toy train --stage inpaint --from DIR` on stages 1-4 writes what the whole run writes (how
    the committed weights were made: stage 5 run on the previously committed model)."""
    whole = train(tmp_path / "whole", SHORT, log=lambda _: None)
    before_stage_5 = dataclasses.replace(SHORT, inpaint_steps=0, shapes_steps=0, pairs_steps=0)
    before = train(tmp_path / "before", before_stage_5, log=lambda _: None)
    continued = continue_training(before, tmp_path / "continued", SHORT, log=lambda _: None)
    # Every weight and the training configuration (configs also record the directory a model was loaded from)
    assert _weights(continued) == _weights(whole)
    assert _training(continued) == _training(whole) == dataclasses.asdict(SHORT)
    for changed in ("transformer", "vae"):  # stage 5 fine-tunes the transformer, then the decoder
        name = f"{changed}/diffusion_pytorch_model.safetensors"
        assert _weights(before)[name] != _weights(whole)[name]
    assert _weights(before).keys() == _weights(whole).keys() and len(_weights(whole)) == 3


@pytest.mark.parametrize("stage", ["transformer", "decoder", "refine", "shapes", "pairs"])
def test_a_run_continues_from_a_later_stage_to_the_same_bytes(tmp_path: Path, stage: str) -> None:
    """`kleinserve toy train --stage STAGE --from DIR` on a model written with 0 steps of that stage and the
    later ones writes what the whole run writes (how the committed weights were made)."""
    whole = train(tmp_path / "whole", SHORT, log=lambda _: None)
    zero = {f"{name}_steps": 0 for name in STAGES[STAGES.index(stage) :]}
    # The earlier stages' settings come from the model continued, the later ones from the configuration.
    parts = train(tmp_path / "parts", dataclasses.replace(SHORT, **zero), log=lambda _: None)
    other_earlier = dataclasses.replace(SHORT, vae_lr=1.0)
    continued = continue_training(
        parts, tmp_path / "continued", other_earlier, log=lambda _: None, stage=stage
    )
    assert _weights(continued) == _weights(whole)
    assert _training(continued) == _training(whole) == dataclasses.asdict(SHORT)
    with pytest.raises(ValueError, match="pairs_steps not 0"):
        continue_training(whole, tmp_path / "y", SHORT, stage=stage)


def test_cli_inpaint_stage_needs_a_model_to_continue(capsys) -> None:
    assert TOY_STAGES == ["all", *STAGES]
    assert main(["toy", "train", "--stage", "inpaint", "--out", "/nonexistent"]) == 2
    assert "--from" in capsys.readouterr().err


def test_cli_eval_scores_a_model_and_reports_the_targets(tmp_path: Path, capsys) -> None:
    model = train(tmp_path / "toy", SHORT, log=lambda _: None)
    arguments = ["--count", "2", "--edits", "2", "--inpaints", "2"]
    status = main(["toy", "eval", "--model", str(model), *arguments])
    out = capsys.readouterr().out
    assert "colour" in out and ">= 90%" in out and "edit colour" in out
    assert "masked colour" in out and "masked kept" in out and "outside the mask" in out
    assert status == 1  # six training steps draw nothing recognisable: the targets are not met


def test_inpainting_batches_start_from_what_the_engine_keeps() -> None:
    """Sampled inputs of an inpainting batch are corrected after each step as the engine corrects them:
    outside the mask exactly the scene noised to the step's sigma, inside it the transformer's own steps."""
    engine = training_pipeline(Flux2KleinPipeline.from_pretrained(TOY_DIR))
    cache = LatentCache(engine)
    rng = random.Random(3)
    examples = [scenes.inpaint_example(rng) for _ in range(2)]
    channels = engine.components.transformer.config.in_channels
    noise = torch.randn((2, 64, channels), generator=torch.Generator().manual_seed(0))
    scheduler = make_scheduler(engine.components.scheduler_config, 4, 64)
    sigmas = scheduler.sigmas
    known = known_latents(cache, examples, 128, noise, sigmas)
    velocity = velocity_fn(engine, cache, examples, 128)
    x, sigma = sampled_input(velocity, noise, scheduler, 3, known)
    assert torch.equal(sigma, sigmas[3].expand(2).float())
    kept = (known.mask == 0).expand_as(x)
    noised = sigmas[3] * noise + (1 - sigmas[3]) * known.clean
    assert torch.equal(x[kept], noised[kept]) and kept.any()
    assert (x[~kept] - noised[~kept]).abs().mean() > 0.1  # painted, not the scene


def test_stage_5_trains_only_the_noise_levels_klein_samples_at() -> None:
    # Stage 5 (TrainConfig.inpaint_schedule_share 1.0) spends every batch on the four levels the 4-step
    # sampler visits; stage 3 (schedule_share 0.5) also trains uniform levels, which other step counts use.
    config = read_config(TOY_DIR / "scheduler" / "scheduler_config.json")
    schedule = make_scheduler(config, 4, 64).sigmas
    generator = torch.Generator().manual_seed(0)
    visited = set(schedule[:4].float().tolist())
    stage_5 = noise_levels(schedule, TrainConfig().inpaint_schedule_share, 400, generator)
    assert set(stage_5.tolist()) == visited and 0.0 not in visited
    stage_3 = noise_levels(schedule, TrainConfig().schedule_share, 400, generator).tolist()
    others = [level for level in stage_3 if level not in visited]
    assert 150 < len(others) < 250 and all(0 <= level < 1 for level in others)


def test_shape_pairs_differ_only_in_the_shape() -> None:
    """Stage 7's caption pairs: same wording but for the shape word, same colour, place and background, the
    partner shape, both training combinations (the held-out ones stay unseen)."""
    examples = shape_pairs(random.Random(5), 64)
    assert len(examples) == 64
    for first, second in zip(examples[0::2], examples[1::2], strict=True):
        (a,), (b,) = first.target.shapes, second.target.shapes
        assert b.kind in PARTNERS[a.kind] and (a.colour, a.position) == (b.colour, b.position)
        assert first.target.background == second.target.background
        words = re.findall(r"\w+|[^\w\s]", first.prompt)
        assert re.findall(r"\w+|[^\w\s]", second.prompt) == [b.kind if w == a.kind else w for w in words]
        assert not scenes.is_held_out(a) and not scenes.is_held_out(b)
    kinds = [example.target.shapes[0].kind for example in examples]
    pairs = set(zip(kinds[0::2], kinds[1::2], strict=True))
    assert pairs == {(shape, partner) for shape, partners in PARTNERS.items() for partner in partners}


def test_a_shape_pair_shares_its_noise_level_and_its_noise() -> None:
    schedule = make_scheduler(read_config(TOY_DIR / "scheduler" / "scheduler_config.json"), 4, 64).sigmas
    generator = torch.Generator().manual_seed(0)
    sigma, noise = batch_noise(schedule, 0.0, torch.Size((6, 16, 8)), True, generator)
    assert sigma.shape == (6,) and noise.shape == (6, 16, 8)
    assert torch.equal(sigma[0::2], sigma[1::2]) and torch.equal(noise[0::2], noise[1::2])
    assert len(set(sigma[0::2].tolist())) == 3 and not torch.equal(noise[0], noise[2])
    sigma, noise = batch_noise(schedule, 0.0, torch.Size((6, 16, 8)), False, generator)
    assert len(set(sigma.tolist())) == 6 and not torch.equal(noise[0], noise[1])


def test_the_pair_loss_weighs_only_what_differs_within_a_pair() -> None:
    """Two pairs of 16 tokens x 8 channels; example 1 has a shape on token 0 (weight FOREGROUND_WEIGHT),
    the rest is background (weight 1); only example 0's token 0 is predicted wrong, by 1 in each channel."""
    x0, target = torch.zeros(4, 16, 8), torch.zeros(4, 16, 8)
    x0[1, 0] = 5.0
    predicted = target.clone()
    predicted[0, 0] = 1.0
    tokens, shape = 4 * 16, FOREGROUND_WEIGHT
    plain = 1 / (tokens - 1 + shape)  # one background token wrong, channels cancel out of the mean
    assert flow_loss(predicted, target, x0).item() == pytest.approx(plain)
    # the pair term weighs token 0 of the first pair as the shape it is in the pair's other example
    paired = plain + 10 * shape / (tokens // 2 - 1 + shape)
    assert flow_loss(predicted, target, x0, pair_weight=10.0).item() == pytest.approx(paired)
    predicted[1, 0] = 1.0  # the same error in both examples of the pair: no pair term
    both = (1 + shape) / (tokens - 1 + shape)
    assert flow_loss(predicted, target, x0, pair_weight=10.0).item() == pytest.approx(both)
