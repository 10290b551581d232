"""The toy model's world: procedurally drawn scenes of 1-2 flat shapes, their captions, and edit examples.

Every image is a pure function of its caption's content (shape, colour, position, background) and its size:
a caption fixes the picture exactly, so a rectified-flow model trained on it learns a near-deterministic map,
and klein's 4-step sampler lands on clean images. Unspecified attributes take fixed defaults (white
background, centre position), never random ones, for the same reason.

Coordinates are fractions of the image side; shapes have radius RADIUS and sit on a 3x3 grid of centres
0.2 / 0.5 / 0.8, so two shapes on different cells never overlap.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from math import cos, pi, sin

from PIL import Image, ImageDraw

# Foreground colours (the 8 named colours of the issue).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (35, 165, 65),
    "cyan": (35, 200, 215),
    "blue": (35, 80, 220),
    "purple": (135, 55, 190),
    "pink": (240, 125, 190),
}
NEUTRALS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
PALETTE: dict[str, tuple[int, int, int]] = {**NEUTRALS, **COLOURS}  # every colour a pixel can have
# Backgrounds of captioned scenes are neutrals, so that a colour word in a caption always names a shape.
# With coloured backgrounds ("a red circle on a blue background") the toy transformer has to bind each
# colour word to its noun by word order; in 60 CPU-minutes it learned the background, never the shape's.
BACKGROUNDS: dict[str, tuple[int, int, int]] = NEUTRALS
SHAPES = ("circle", "square", "triangle", "star", "ring")
# Position name -> (x, y) centre as fractions of the side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top-left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top-right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom-left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom-right": (0.8, 0.8),
}
RADIUS = 0.14
DEFAULT_BACKGROUND = "white"
DEFAULT_POSITION = "centre"
SUPERSAMPLE = 4  # drawn this many times larger, then box-filtered: smooth edges, exact flat colours


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str = DEFAULT_BACKGROUND


def render(scene: Scene, side: int) -> Image.Image:
    """The scene as an RGB image of side x side pixels."""
    placed = [(shape.kind, shape.colour, *POSITIONS[shape.position], RADIUS) for shape in scene.shapes]
    return render_placed(scene.background, placed, side)


# (kind, colour, x, y, radius), coordinates and radius as fractions of the side
Placed = tuple[str, str, float, float, float]


def render_placed(background: str, shapes: list[Placed], side: int) -> Image.Image:
    """Shapes at any position and size, drawn in order over `background`."""
    big = side * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(image)
    for kind, colour, x, y, radius in shapes:
        _draw_shape(draw, kind, x * big, y * big, radius * big, COLOURS[colour], background)
    return image.resize((side, side), Image.Resampling.BOX)


def busy_scene(rng: random.Random, side: int) -> Image.Image:
    """2-6 shapes of any size, place and colour: what the VAE trains on, so that most of its loss is spent on
    shapes (in the captioned scenes the background is 90 % of the pixels)."""
    background = rng.choice(list(PALETTE))  # any colour: the VAE must draw every background
    colours = [c for c in COLOURS if c != background]
    shapes = [
        (rng.choice(SHAPES), rng.choice(colours), rng.random(), rng.random(), rng.uniform(0.08, 0.3))
        for _ in range(rng.randint(2, 6))
    ]
    return render_placed(background, shapes, side)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    x: float,
    y: float,
    r: float,
    fill: tuple[int, int, int],
    background: str,
) -> None:
    if kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif kind == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        inner = 0.55 * r
        draw.ellipse((x - inner, y - inner, x + inner, y + inner), fill=PALETTE[background])
    elif kind == "square":
        half = 0.82 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif kind == "triangle":
        # Equilateral, pointing up, centroid at (x, y), vertices on the circle of radius r.
        draw.polygon([(x + r * cos(a), y - r * sin(a)) for a in (pi / 2, pi * 7 / 6, pi * 11 / 6)], fill=fill)
    elif kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = pi / 2 + k * pi / 5
            points.append((x + radius * cos(angle), y - radius * sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


# Caption wording. `{p}` is a position phrase (may be empty for the centre), `{b}` a background phrase.
_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top-left": ("in the top left corner", "at the top-left", "top left"),
    "top": ("at the top", "near the top edge", "top"),
    "top-right": ("in the top right corner", "at the top-right", "top right"),
    "left": ("on the left", "at the left side", "left"),
    "centre": ("in the centre", "in the middle", "in the center"),
    "right": ("on the right", "at the right side", "right"),
    "bottom-left": ("in the bottom left corner", "at the bottom-left", "bottom left"),
    "bottom": ("at the bottom", "near the bottom edge", "bottom"),
    "bottom-right": ("in the bottom right corner", "at the bottom-right", "bottom right"),
}
_SINGLE_TEMPLATES = (
    "a {c} {s} {p} on a {b} background",
    "a {c} {s} {p}, {b} background",
    "{c} {s}, {p}, on {b}",
    "{b} background with a {c} {s} {p}",
    "draw a {c} {s} {p} over a {b} backdrop",
    "a {s} coloured {c} {p} on a plain {b} background",
)
_PAIR_TEMPLATES = (
    "a {c} {s} {p} and a {c2} {s2} {p2} on a {b} background",
    "{b} background, a {c} {s} {p}, a {c2} {s2} {p2}",
)
_RECOLOUR_TEMPLATES = (
    "make the {s} {c}",
    "change the colour of the {s} to {c}",
    "turn the {s} {c}",
    "recolor the {s} {c}",
)
_BACKGROUND_TEMPLATES = ("make the background {b}", "change the background to {b}")
_COMPOSE_TEMPLATES = (
    "put the shape from image 1 on the background of image 2",
    "place the shape of image 1 onto the background of image 2",
)
# What to paint inside a mask: no position (the mask says where) and only words the tokenizer already has, so
# that the committed text encoder reads them.
_INPAINT_TEMPLATES = ("a {c} {s}", "draw a {c} {s}", "a {s} coloured {c}")


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption for a text-to-image scene in one of several wordings."""
    a = scene.shapes[0]
    fields = {
        "c": a.colour,
        "s": a.kind,
        "p": rng.choice(_POSITION_PHRASES[a.position]),
        "b": scene.background,
    }
    if len(scene.shapes) == 1:
        if a.position == DEFAULT_POSITION and rng.random() < 0.3:
            fields["p"] = ""  # no position given means the centre
        text = rng.choice(_SINGLE_TEMPLATES).format(**fields)
        if scene.background == DEFAULT_BACKGROUND and rng.random() < 0.3:
            text = f"a {a.colour} {a.kind} {fields['p']}"  # no background given means white
    else:
        b = scene.shapes[1]
        fields |= {"c2": b.colour, "s2": b.kind, "p2": rng.choice(_POSITION_PHRASES[b.position])}
        text = rng.choice(_PAIR_TEMPLATES).format(**fields)
    return " ".join(text.replace(" ,", ",").split())


def vocabulary() -> list[str]:
    """Every word and punctuation mark a caption can contain, in a fixed order (the tokenizer's vocab)."""
    texts = [*_SINGLE_TEMPLATES, *_PAIR_TEMPLATES, *_RECOLOUR_TEMPLATES, *_BACKGROUND_TEMPLATES]
    texts += [*_COMPOSE_TEMPLATES, "a"]
    texts += [phrase for phrases in _POSITION_PHRASES.values() for phrase in phrases]
    texts += [*PALETTE, *SHAPES]
    words: dict[str, None] = {}
    for text in texts:
        for word in text.replace("{", " ").replace("}", " ").replace(",", " , ").replace("-", " - ").split():
            if word not in ("c", "s", "p", "b", "c2", "s2", "p2"):
                words[word] = None
    return list(words)


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: prompt + reference scenes -> target scene."""

    prompt: str
    target: Scene
    references: tuple[Scene, ...] = ()
    kind: str = "text"  # text | recolour | background | compose | inpaint


def is_held_out(shape: Shape) -> bool:
    """One (shape, colour, position) combination in nine never appears in a training caption: for each
    (shape, colour) one position, a different one as the shape or the colour changes, so that every position,
    colour and shape is both trained and evaluated."""
    index = SHAPES.index(shape.kind) * 2 + list(COLOURS).index(shape.colour) * 4
    return (index + list(POSITIONS).index(shape.position)) % 9 == 4


def random_shape(rng: random.Random, held_out: bool | None = False, position: str | None = None) -> Shape:
    """A random shape; `held_out` True/False: only evaluation/training combinations; None: any."""
    while True:
        shape = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), position or rng.choice(list(POSITIONS)))
        if held_out is None or is_held_out(shape) == held_out:
            return shape


def random_background(rng: random.Random, avoid: set[str]) -> str:
    if rng.random() < 0.4:
        return DEFAULT_BACKGROUND if DEFAULT_BACKGROUND not in avoid else "black"
    return rng.choice([b for b in BACKGROUNDS if b not in avoid])


def text_example(rng: random.Random, shapes: int = 1, held_out: bool = False) -> Example:
    first = random_shape(rng, held_out)
    chosen = [first]
    if shapes == 2:
        position = rng.choice([p for p in POSITIONS if p != first.position])
        chosen.append(random_shape(rng, None, position))
    scene = Scene(tuple(chosen), random_background(rng, {s.colour for s in chosen}))
    return Example(caption(scene, rng), scene)


# Stage 7's pairs (shape_pairs): each shape with those the model drew in its place (circles came out as
# squares and as triangles, stars as triangles, rings as squares), one at random.
PARTNERS = {
    "circle": ("square", "triangle"),
    "square": ("circle",),
    "triangle": ("star", "circle"),
    "star": ("triangle",),
    "ring": ("circle",),
}


def shape_pairs(rng: random.Random, count: int) -> list[Example]:
    """`count` (even) caption examples in pairs: a training caption, then the same caption (wording, colour,
    place, background) with one of its shape's PARTNERS, itself a training combination."""
    examples: list[Example] = []
    while len(examples) < count:
        first = text_example(rng)
        shape = first.target.shapes[0]
        other = replace(shape, kind=rng.choice(PARTNERS[shape.kind]))
        if is_held_out(other):
            continue
        prompt = re.sub(rf"\b{shape.kind}\b", other.kind, first.prompt)
        examples += [first, Example(prompt, replace(first.target, shapes=(other,)))]
    return examples


def recolour_example(rng: random.Random) -> Example:
    shape = random_shape(rng, None)
    new_colour = rng.choice([c for c in COLOURS if c != shape.colour])
    background = random_background(rng, {shape.colour, new_colour})
    before = Scene((shape,), background)
    after = Scene((replace(shape, colour=new_colour),), background)
    prompt = rng.choice(_RECOLOUR_TEMPLATES).format(s=shape.kind, c=new_colour)
    return Example(prompt, after, (before,), "recolour")


def background_example(rng: random.Random) -> Example:
    shape = random_shape(rng, None)
    before = Scene((shape,), random_background(rng, {shape.colour}))
    new_background = rng.choice([b for b in BACKGROUNDS if b not in (shape.colour, before.background)])
    prompt = rng.choice(_BACKGROUND_TEMPLATES).format(b=new_background)
    return Example(prompt, replace(before, background=new_background), (before,), "background")


def compose_example(rng: random.Random) -> Example:
    shape = random_shape(rng, None)
    first = Scene((shape,), random_background(rng, {shape.colour}))
    other = random_shape(rng, None)
    second = Scene((other,), random_background(rng, {shape.colour, other.colour, first.background}))
    target = Scene((shape,), second.background)
    return Example(rng.choice(_COMPOSE_TEMPLATES), target, (first, second), "compose")


# Half the side of an inpainting mask's square, as a fraction of the image side: the square holds a shape of
# RADIUS (0.14) on its cell and stops short of a shape on the next cell (its edge 0.3 - RADIUS = 0.16 away).
INPAINT_HALF = 0.155


def inpaint_example(rng: random.Random, held_out: bool = False) -> Example:
    """A scene of one shape (the reference) and the prompt to paint a new shape, of another colour, into the
    square of an empty cell (`inpaint_mask`); the target is the scene with both. `held_out`: the new shape's
    (shape, colour, position) is an evaluation combination, else a training one."""
    shape = random_shape(rng, None)
    position = rng.choice([p for p in POSITIONS if p != shape.position])
    while True:
        new = random_shape(rng, held_out, position)
        if new.colour != shape.colour:
            break
    background = random_background(rng, {shape.colour, new.colour})
    prompt = rng.choice(_INPAINT_TEMPLATES).format(c=new.colour, s=new.kind)
    before = Scene((shape,), background)
    return Example(prompt, replace(before, shapes=(shape, new)), (before,), "inpaint")


def inpaint_mask(example: Example, side: int) -> Image.Image:
    """The "L" mask of an inpainting example at side x side: cell_mask of its new (last) shape's cell."""
    return cell_mask(example.target.shapes[-1].position, side)


def cell_mask(position: str, side: int) -> Image.Image:
    """An "L" mask (255: repaint, 0: keep) at side x side: the square of INPAINT_HALF around a position."""
    x, y = POSITIONS[position]
    mask = Image.new("L", (side, side), 0)
    box = [round((c + sign * INPAINT_HALF) * side) for sign in (-1, 1) for c in (x, y)]
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


# What a prompt says, attribute by attribute: the text encoder learns to write this into the last prompt token
# (train.train_text_encoder). None: the prompt does not say (an edit takes it from the reference).
PARSE_FIELDS: dict[str, tuple[str, ...]] = {
    "kind": ("text", "recolour", "background", "compose"),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
    "colour2": tuple(COLOURS),
    "shape2": SHAPES,
    "position2": tuple(POSITIONS),
}


def parse(example: Example) -> dict[str, str | None]:
    """The attributes `example.prompt` names (defaults it implies included), by PARSE_FIELDS name."""
    shapes, background = example.target.shapes, example.target.background
    said: dict[str, str | None] = dict.fromkeys(PARSE_FIELDS)
    said["kind"] = example.kind
    if example.kind == "text":
        for suffix, shape in zip(("", "2"), shapes, strict=False):
            said |= {f"colour{suffix}": shape.colour, f"shape{suffix}": shape.kind}
            said[f"position{suffix}"] = shape.position
        said["background"] = background
    elif example.kind == "recolour":
        said |= {"colour": shapes[0].colour, "shape": shapes[0].kind}
    elif example.kind == "background":
        said["background"] = background
    return said
