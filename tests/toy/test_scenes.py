"""The toy world: scenes render deterministically and the evaluation analyser reads back what was drawn."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from kleinserve.toy import scenes
from kleinserve.toy.evaluate import analyse, check_inpaint, colour_shares
from kleinserve.toy.model import UNKNOWN, make_word_tokenizer


@pytest.mark.parametrize("side", [128, 256, 96])
def test_analyser_reads_back_every_drawn_single_shape_scene(side: int) -> None:
    rng = random.Random(side)
    for _ in range(150):
        example = scenes.text_example(rng, held_out=rng.random() < 0.5)
        shape = example.target.shapes[0]
        found = analyse(scenes.render(example.target, side))
        assert (found.colour, found.position, found.background) == (
            shape.colour,
            shape.position,
            example.target.background,
        ), example


@pytest.mark.parametrize("blur", [4, 8])
def test_analyser_reads_the_colour_of_soft_shapes(blur: int) -> None:
    """Softness is not a colour error: shapes blurred by a Gaussian of `blur` px (at 256 px) keep their
    colour. The previous analyser (the foreground's median) named 90 % right at 4 px, 62 % at 8 px."""
    rng = random.Random(blur)
    for index in range(60):
        example = scenes.text_example(rng, held_out=rng.random() < 0.5)
        side = (128, 256)[index % 2]
        soft = scenes.render(example.target, side).filter(ImageFilter.GaussianBlur(blur * side / 256))
        assert analyse(soft).colour == example.target.shapes[0].colour, example


def test_analyser_counts_a_haze_of_another_hue_against_the_shape() -> None:
    """A red disc inside a wider pink halo is mostly pink: a mixture with the background explains softness,
    never a change of hue."""
    image = Image.new("RGB", (128, 128), scenes.NEUTRALS["white"])
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 24, 104, 104), fill=scenes.COLOURS["pink"])
    draw.ellipse((49, 49, 79, 79), fill=scenes.COLOURS["red"])
    shares = colour_shares(image)
    assert analyse(image).colour == "pink"
    assert 0.1 < shares["red"] < 0.2 and shares["pink"] > 0.8, shares


def test_analyser_finds_no_foreground_on_a_plain_background() -> None:
    found = analyse(scenes.render(scenes.Scene((), "pink"), 128))
    assert (found.background, found.colour, found.position) == ("pink", None, None)


def test_examples_and_renders_are_deterministic() -> None:
    first = [scenes.compose_example(random.Random(7)) for _ in range(2)]
    assert first[0] == first[1]
    assert scenes.render(first[0].target, 128).tobytes() == scenes.render(first[1].target, 128).tobytes()


def test_edits_change_only_what_the_prompt_names() -> None:
    rng = random.Random(3)
    recolour = scenes.recolour_example(rng)
    (before,), after = recolour.references, recolour.target
    assert before.background == after.background
    assert before.shapes[0].position == after.shapes[0].position
    assert before.shapes[0].colour != after.shapes[0].colour
    assert after.shapes[0].colour in recolour.prompt
    compose = scenes.compose_example(rng)
    assert compose.target.shapes == compose.references[0].shapes
    assert compose.target.background == compose.references[1].background


@pytest.mark.parametrize("side", [128, 256])
def test_an_inpainting_mask_holds_the_new_shape_and_spares_the_old_one(side: int) -> None:
    rng = random.Random(side)
    for _ in range(100):
        example = scenes.inpaint_example(rng)
        (before,), (old, new) = example.references, example.target.shapes
        assert before.shapes == (old,) and before.background == example.target.background
        assert new.position != old.position and new.colour != old.colour
        assert new.colour in example.prompt and new.kind in example.prompt
        repaint = np.asarray(scenes.inpaint_mask(example, side)) >= 128
        background = np.array(scenes.PALETTE[before.background])
        drawn = {
            shape: (
                np.asarray(scenes.render(scenes.Scene((shape,), before.background), side)) != background
            ).any(axis=-1)
            for shape in (old, new)
        }
        assert repaint[drawn[new]].all(), example  # every pixel of the new shape is repainted
        assert not repaint[drawn[old]].any(), example  # none of the old one
        assert 0.08 < repaint.mean() < 0.11  # a square of side 0.31


def test_the_masked_edit_check_passes_the_target_and_fails_what_misses_it() -> None:
    rng = random.Random(4)
    for index in range(30):
        example = scenes.inpaint_example(rng, held_out=True)
        side = (128, 256)[index % 2]
        target = check_inpaint(example, scenes.render(example.target, side))
        assert (target.colour, target.kept, target.difference) == (True, True, 0.0), example
        unchanged = check_inpaint(example, scenes.render(example.references[0], side))
        assert (unchanged.colour, unchanged.kept) == (False, True)  # nothing painted
        old, new = example.target.shapes
        moved = scenes.Scene((replace(old, position=new.position), new), example.target.background)
        assert not check_inpaint(example, scenes.render(moved, side)).kept  # the old shape did not stay
        pixels = np.asarray(scenes.render(example.target, side)).astype(np.int16)
        off = Image.fromarray((pixels + np.where(pixels < 128, 10, -10)).astype(np.uint8))
        off_check = check_inpaint(example, off)  # every pixel 10 levels off: the analyser alone would pass it
        assert not off_check.kept and off_check.difference == 10.0


def test_inpainting_evaluation_paints_held_out_combinations() -> None:
    rng = random.Random(2)
    new = [scenes.inpaint_example(rng, held_out=True).target.shapes[-1] for _ in range(50)]
    assert all(scenes.is_held_out(shape) for shape in new)
    assert not any(scenes.is_held_out(scenes.inpaint_example(rng).target.shapes[-1]) for _ in range(50))


def test_held_out_combinations_never_reach_training_captions() -> None:
    rng = random.Random(0)
    held = {scenes.random_shape(rng, held_out=True) for _ in range(2000)}
    trained = {scenes.text_example(rng).target.shapes[0] for _ in range(2000)}
    assert held and not held & trained
    assert 0.08 < len(held) / (len(held) + len(trained)) < 0.2
    # Every position, colour and shape is both trained and held out (one held-out position for all once made
    # the evaluation ask only for shapes in the centre, which no training caption had).
    for field in ("kind", "colour", "position"):
        assert {getattr(s, field) for s in held} == {getattr(s, field) for s in trained}


def test_every_caption_word_is_in_the_tokenizer() -> None:
    tokenizer = make_word_tokenizer()
    unknown = tokenizer.convert_tokens_to_ids(UNKNOWN)
    rng = random.Random(1)
    for make in (
        scenes.text_example,
        scenes.recolour_example,
        scenes.background_example,
        scenes.compose_example,
        scenes.inpaint_example,
    ):
        prompt = make(rng).prompt
        assert unknown not in tokenizer(prompt)["input_ids"], prompt
    assert tokenizer("a zebra")["input_ids"][1] == unknown


def test_parse_says_what_the_prompt_names_and_only_that() -> None:
    rng = random.Random(5)
    text = scenes.text_example(rng, shapes=2)
    first, second = text.target.shapes
    assert scenes.parse(text) == {
        "kind": "text",
        "colour": first.colour,
        "shape": first.kind,
        "position": first.position,
        "background": text.target.background,
        "colour2": second.colour,
        "shape2": second.kind,
        "position2": second.position,
    }
    recolour = scenes.recolour_example(rng)
    said = scenes.parse(recolour)
    assert (said["kind"], said["colour"], said["shape"]) == ("recolour", *_colour_kind(recolour))
    assert said["colour"] in recolour.prompt and said["shape"] in recolour.prompt
    assert said["position"] is None and said["background"] is None  # taken from the reference
    assert set(scenes.parse(scenes.compose_example(rng)).values()) == {"compose", None}
    for field, value in scenes.parse(scenes.background_example(rng)).items():
        assert (value is None) == (field not in ("kind", "background"))


def _colour_kind(example: scenes.Example) -> tuple[str, str]:
    return example.target.shapes[0].colour, example.target.shapes[0].kind
