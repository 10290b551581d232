"""`kleinserve toy grid`: held-out captions drawn by a toy model, in one PNG a reader can look at.

Each cell is one caption (scenes.text_example with held_out=True: the same captions and seeds as the first
ones `kleinserve toy eval` scores) drawn at every requested side, left to right at its own pixel size, with
the caption under it in PIL's default font.

    kleinserve toy grid --out docs/toy-grid.png
"""

from __future__ import annotations

import random
import textwrap

from PIL import Image, ImageDraw, ImageFont

from kleinserve.engine.pipeline import Pipeline
from kleinserve.toy import scenes
from kleinserve.toy.evaluate import SIDES, generate_example

COLUMNS = 4  # cells per row
PAD = 8  # px around and between cells, and between the sides inside a cell
LINE_HEIGHT = 14  # px per caption line (the default font is 11 px tall)
CAPTION_LINES = 4  # room under each cell; a caption wraps to fit its cell's width


def cell_size(sides: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) in px of one cell: the sides next to each other, the caption band under them."""
    return sum(sides) + PAD * (len(sides) - 1), max(sides) + CAPTION_LINES * LINE_HEIGHT


def draw_grid(
    pipeline: Pipeline, count: int = 12, sides: tuple[int, ...] = SIDES, seed: int = 1234
) -> Image.Image:
    """`count` held-out captions, each drawn at `sides` (px) with seed `seed + index`, in rows of COLUMNS
    cells on white: an RGB image of min(count, COLUMNS) x ceil(count / COLUMNS) cells of `cell_size(sides)`,
    PAD around each."""
    width, height = cell_size(sides)
    columns = min(count, COLUMNS)
    rows = -(-count // columns)
    grid = Image.new("RGB", (PAD + columns * (width + PAD), PAD + rows * (height + PAD)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    rng = random.Random(seed)
    for index in range(count):
        example = scenes.text_example(rng, held_out=True)
        x = PAD + (index % columns) * (width + PAD)
        y = PAD + (index // columns) * (height + PAD)
        left = x
        for side in sides:
            grid.paste(generate_example(pipeline, example, side, seed + index), (left, y))
            left += side + PAD
        for line, text in enumerate(_wrap(example.prompt, font, width)[:CAPTION_LINES]):
            draw.text((x, y + max(sides) + 2 + line * LINE_HEIGHT), text, fill="black", font=font)
    return grid


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` px in `font` (a word wider than that gets its own line)."""
    for chars in range(len(text), 0, -1):
        lines = textwrap.wrap(text, chars)
        if all(font.getlength(line) <= width for line in lines):
            return lines
    return textwrap.wrap(text, 1, break_long_words=False)
