"""`kleinserve toy grid`: one PNG of held-out captions as the committed toy model draws them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from kleinserve.cli import main
from kleinserve.engine import load_pipeline
from kleinserve.engine.loading import TOY_NAME
from kleinserve.toy import scenes
from kleinserve.toy.evaluate import generate_example


def test_toy_grid_writes_each_caption_at_each_side_with_the_caption_under_it(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "grid.png"
    assert main(["toy", "grid", "--count", "2", "--side", "128", "--side", "64", "--out", str(out)]) == 0
    grid = Image.open(out)
    # Two cells of 128 + 8 + 64 = 200 x (128 + 4 caption lines of 14) px, 8 px around each.
    assert (grid.format, grid.mode, grid.size) == ("PNG", "RGB", (8 + 2 * (200 + 8), 8 + 184 + 8))
    # The first cell holds the first held-out caption `toy eval` scores, drawn with its seed at both sides.
    example = scenes.text_example(random.Random(1234), held_out=True)
    toy = load_pipeline(TOY_NAME, dtype="float32")
    for left, side in ((8, 128), (8 + 128 + 8, 64)):
        drawn = generate_example(toy, example, side, 1234)
        assert grid.crop((left, 8, left + side, 8 + side)).tobytes() == drawn.tobytes(), side
    caption = np.asarray(grid.crop((8, 8 + 128, 8 + 200, 8 + 184)).convert("L"))
    assert (caption < 100).sum() > 50  # black text on white under the pictures
    under_the_smaller = grid.crop((8 + 128 + 8, 8 + 64, 8 + 200, 8 + 128))  # white: sides are top-aligned
    assert (np.asarray(under_the_smaller.convert("L")) == 255).all()
