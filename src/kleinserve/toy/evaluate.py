"""`kleinserve toy eval`: render held-out captions and edits, score them with a deterministic analyser.

The analyser knows nothing of the model: the background is the median colour of the image's border, the
foreground every pixel farther than FOREGROUND_DISTANCE from it (RGB Euclidean), its position the 3x3 cell
holding the foreground's centre of mass, its colour the named colour that explains most foreground pixels as
that colour mixed with the background (`colour_shares`), its shape and whether it is one clean shape read from
the pixels of that colour (shapes.read_shape, which has its measurements: 100 % of true renders read back,
sharp or blurred by up to 8 px at 256 px).

Why mixtures: a soft edge is the shape's colour blended with the background, and judging each pixel (or the
foreground's median) by the nearest named colour reads softness as a wrong colour. On the true renders of
200 held-out captions blurred by a Gaussian of 4 / 6 / 8 px (at 256 px), the foreground median named 90 / 69
/ 62 % of the colours right and the plurality of nearest colours 98 / 77 / 66 %, mixtures 100 / 100 / 100 %.
A wrong hue still counts as wrong: a pink haze around a red shape is pink, not a lighter red
(tests/toy/test_scenes.py guards both).

Targets (issue 5): colour correct >= 90 %, position correct >= 80 % on captions whose (shape, colour,
position) combination never occurs in training; edit colour changes >= 80 %. Masked edits (issue 18,
scenes.inpaint_example: paint a new shape into the empty square of a one-shape scene): outside the mask the
scene is kept in every edit (the analyser reads its background and shape there, and the mean absolute
difference over the kept pixels is at most KEPT_DIFFERENCE), and inside it the new colour is right >= 80 %.
Issue 20 (SIDE_TARGETS), on held-out captions at 128 and at 256 px separately: shape right (and no second
blob of its colour) >= 85 %, one clean shape >= 85 %, colour >= 90 %, position >= 90 %.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kleinserve.engine.inpaint import MASK_THRESHOLD
from kleinserve.engine.pipeline import Pipeline
from kleinserve.toy import scenes, shapes
from kleinserve.types import GenerateRequest

FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND = 0.01  # of the image's pixels; less is "nothing drawn"
KEPT_DIFFERENCE = 8.0  # mean |output - scene| over the pixels a mask keeps, in 0-255 levels
TARGETS = {"colour": 0.90, "position": 0.80, "edit_colour": 0.80, "inpaint_colour": 0.80, "inpaint_kept": 1.0}
SIDES = (128, 256)  # the evaluation alternates them
# Issue 20: met at each side alone
SIDE_TARGETS = {"shape": 0.85, "clean": 0.85, "colour": 0.90, "position": 0.90}
_ROWS, _COLUMNS = ("top", "", "bottom"), ("left", "", "right")


@dataclass(frozen=True)
class Analysis:
    background: str
    colour: str | None  # None when no foreground was found
    position: str | None
    foreground: float  # fraction of pixels
    shape: str | None  # shapes.read_shape of the colour's pixels; None: no foreground, or a second blob
    clean: bool  # shapes.read_shape: one component of the colour's pixels is >= 80 % of the foreground


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((rgb - np.array(palette[name])) ** 2)))


def foreground(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask (H, W) of foreground pixels, background RGB (3,), pixels (H, W, 3) float) of an image."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width, _ = pixels.shape
    frame = max(1, min(height, width) // 32)
    border = np.concatenate(
        [
            pixels[:frame].reshape(-1, 3),
            pixels[-frame:].reshape(-1, 3),
            pixels[:, :frame].reshape(-1, 3),
            pixels[:, -frame:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=2) > FOREGROUND_DISTANCE, background, pixels


def colour_shares(image: Image.Image) -> dict[str, float]:
    """Named colour -> fraction of the foreground's pixels best explained as that colour mixed with the
    background (pixel = background + a * (colour - background), 0 <= a <= 1), largest first; {} without a
    foreground."""
    best = _explain(*foreground(image))
    if not len(best):
        return {}
    shares = np.bincount(best, minlength=len(scenes.COLOURS)) / len(best)
    return dict(sorted(zip(scenes.COLOURS, shares.tolist(), strict=True), key=lambda item: -item[1]))


def _explain(mask: np.ndarray, background: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """For each foreground pixel (row-major order), the index into scenes.COLOURS of the colour that best
    explains it mixed with the background: (N,) int."""
    shown = pixels[mask] - background  # (N, 3)
    directions = np.array(list(scenes.COLOURS.values()), dtype=np.float64) - background  # (K, 3)
    lengths = np.maximum((directions**2).sum(axis=1), 1e-9)  # a colour equal to the background explains 0
    amounts = np.clip(shown @ directions.T / lengths, 0.0, 1.0)  # (N, K)
    residuals = ((shown[:, None, :] - amounts[..., None] * directions[None]) ** 2).sum(axis=-1)
    return residuals.argmin(axis=1)


def analyse(image: Image.Image) -> Analysis:
    """Background colour, foreground colour, position and shape of a one-shape image."""
    mask, background_rgb, pixels = foreground(image)
    height, width = mask.shape
    background = _nearest(background_rgb, scenes.PALETTE)
    fraction = float(mask.mean())
    if fraction < MIN_FOREGROUND:
        return Analysis(background, None, None, fraction, None, False)
    best = _explain(mask, background_rgb, pixels)
    index = int(np.bincount(best).argmax())
    ys, xs = np.nonzero(mask)
    row = _ROWS[min(2, int(3 * ys.mean() / height))]
    column = _COLUMNS[min(2, int(3 * xs.mean() / width))]
    position = "-".join(part for part in (row, column) if part) or "centre"
    own = np.zeros_like(mask)
    own[mask] = best == index  # the foreground pixels of the analysed colour
    reading = shapes.read_shape(own, mask)
    return Analysis(background, list(scenes.COLOURS)[index], position, fraction, reading.shape, reading.clean)


@dataclass(frozen=True)
class Score:
    colour: float
    position: float
    background: float
    shape: float  # held-out captions drawn as the caption's shape and in one blob (shapes.read_shape)
    clean: float  # held-out captions drawn as one clean shape (shapes.read_shape)
    edit_colour: float
    edit_position: float
    edit_shape: float  # recolouring edits that keep the reference's shape, in one blob
    edit_clean: float
    inpaint_colour: float  # masked edits whose new shape has the prompt's colour inside the mask
    inpaint_kept: float  # masked edits that kept the scene outside the mask (module docstring)
    inpaint_difference: float  # mean |output - scene| over kept pixels, 0-255 levels, averaged over edits
    # side -> the caption and edit fractions above (colour ... edit_clean) over that side's images alone;
    # only sides that were drawn
    by_side: dict[int, dict[str, float]]
    text_count: int
    edit_count: int
    inpaint_count: int

    def missed(self) -> set[str]:
        """The targets not met: TARGETS' names, and "name@side" for SIDE_TARGETS (e.g. "shape@256")."""
        missed = {name for name, target in TARGETS.items() if getattr(self, name) < target}
        for side, fractions in self.by_side.items():
            missed |= {f"{name}@{side}" for name, target in SIDE_TARGETS.items() if fractions[name] < target}
        return missed

    def meets_targets(self) -> bool:
        return not self.missed()


@dataclass(frozen=True)
class InpaintCheck:
    colour: bool  # the prompt's colour inside the mask
    kept: bool  # the scene outside it: background and shape as before, difference <= KEPT_DIFFERENCE
    difference: float  # mean |output - scene| over the kept pixels, 0-255 levels


def check_inpaint(example: scenes.Example, image: Image.Image) -> InpaintCheck:
    """Score a masked edit of an inpainting example (scenes.inpaint_example) drawn at `image`'s size. Each
    side of the mask is analysed alone: outside, the output with the scene put back inside the mask; inside,
    the output's mask region over a plain background of the scene's colour."""
    side = image.width
    (scene,) = example.references
    before, mask = scenes.render(scene, side), scenes.inpaint_mask(example, side)
    keep = np.asarray(mask) < MASK_THRESHOLD
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    difference = float(np.abs(pixels - np.asarray(before, dtype=np.float64))[keep].mean())
    outside = analyse(Image.composite(before, image, mask))
    (shape,) = scene.shapes
    found = (outside.background, outside.colour, outside.position)
    kept = found == (scene.background, shape.colour, shape.position)
    plain = scenes.render(scenes.Scene((), scene.background), side)
    inside = analyse(Image.composite(image, plain, mask))
    return InpaintCheck(
        colour=inside.colour == example.target.shapes[-1].colour,
        kept=kept and difference <= KEPT_DIFFERENCE,
        difference=difference,
    )


def generate_example(pipeline: Pipeline, example: scenes.Example, side: int, seed: int) -> Image.Image:
    """The example drawn by `pipeline` at side x side px with `seed` (its references drawn at that size, an
    inpainting example's mask too)."""
    references = tuple(scenes.render(scene, side) for scene in example.references)
    mask = scenes.inpaint_mask(example, side) if example.kind == "inpaint" else None
    request = GenerateRequest(
        prompt=example.prompt, width=side, height=side, seed=seed, reference_images=references, mask=mask
    )
    return pipeline.generate(request).images[0].image


def _judge(found: Analysis, expected: scenes.Shape, prefix: str = "") -> dict[str, bool]:
    """Whether the analysed image has the expected shape's colour, position and shape, and is one clean shape;
    keys prefixed by `prefix` (Score's field names)."""
    judged = {
        "colour": found.colour == expected.colour,
        "position": found.position == expected.position,
        "shape": found.shape == expected.kind,
        "clean": found.clean,
    }
    return {prefix + name: value for name, value in judged.items()}


def _fractions(judged: list[dict[str, bool]]) -> dict[str, float]:
    """Name -> fraction of the judged images where it holds; {} for no images."""
    return {name: sum(one[name] for one in judged) / len(judged) for name in judged[0]} if judged else {}


def evaluate(
    pipeline: Pipeline, count: int = 144, edits: int = 24, inpaints: int = 12, seed: int = 1234
) -> Score:
    """Score `count` held-out captions, `edits` recolouring edits and `inpaints` masked edits (new shapes of
    held-out combinations), alternating the SIDES (128 and 256 px)."""
    rng = random.Random(seed)
    captions: list[tuple[int, dict[str, bool]]] = []  # (side, judged)
    for index in range(count):
        example = scenes.text_example(rng, held_out=True)
        side = SIDES[index % len(SIDES)]
        found = analyse(generate_example(pipeline, example, side, seed + index))
        judged = _judge(found, example.target.shapes[0])
        captions.append((side, judged | {"background": found.background == example.target.background}))
    recolours: list[tuple[int, dict[str, bool]]] = []
    for index in range(edits):
        example = scenes.recolour_example(rng)
        side = SIDES[index % len(SIDES)]
        found = analyse(generate_example(pipeline, example, side, seed + index))
        recolours.append((side, _judge(found, example.target.shapes[0], prefix="edit_")))
    checks = []
    for index in range(inpaints):
        example = scenes.inpaint_example(rng, held_out=True)
        image = generate_example(pipeline, example, SIDES[index % len(SIDES)], seed + index)
        checks.append(check_inpaint(example, image))
    by_side = {
        side: _fractions([judged for drawn, judged in captions if drawn == side])
        | _fractions([judged for drawn, judged in recolours if drawn == side])
        for side in SIDES
        if any(drawn == side for drawn, _ in captions)
    }
    caption = _fractions([judged for _, judged in captions])
    edit = _fractions([judged for _, judged in recolours])
    return Score(
        colour=caption["colour"],
        position=caption["position"],
        background=caption["background"],
        shape=caption["shape"],
        clean=caption["clean"],
        edit_colour=edit["edit_colour"],
        edit_position=edit["edit_position"],
        edit_shape=edit["edit_shape"],
        edit_clean=edit["edit_clean"],
        inpaint_colour=sum(check.colour for check in checks) / inpaints,
        inpaint_kept=sum(check.kept for check in checks) / inpaints,
        inpaint_difference=sum(check.difference for check in checks) / inpaints,
        by_side=by_side,
        text_count=count,
        edit_count=edits,
        inpaint_count=inpaints,
    )
