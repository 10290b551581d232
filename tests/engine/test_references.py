"""Reference image checks and conversions, before any pixel reaches the VAE."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kleinserve.engine.references import prepare_reference
from kleinserve.errors import InvalidInput
from tests.conftest import random_image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb_in_unit_range(mode):
    prepared = prepare_reference(random_image(80, 70, seed=3, mode=mode))
    assert prepared.pixels.shape == (1, 3, 64, 80)
    assert prepared.pixels.min() >= -1.0 and prepared.pixels.max() <= 1.0
    assert prepared.size == (80, 64) and prepared.grid == (4, 5)


def test_sixteen_bit_grey_keeps_its_brightness():
    grey = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).convert("I;16")
    # 40000 / 65535 of full scale: mid-light grey, not clipped to white nor wrapped to black
    value = float(prepare_reference(grey).pixels.mean())
    assert -0.5 < value < 0.9


@pytest.mark.parametrize(
    ("size", "allowed"),
    [((63, 100), "both sides >= 64 px"), ((64, 600), "aspect ratio up to 8:1")],
)
def test_bad_geometry_is_refused(size, allowed):
    with pytest.raises(InvalidInput, match=allowed) as caught:
        prepare_reference(random_image(*size, seed=1), index=2)
    assert caught.value.param == "reference_images[2]"


def test_transparency_is_composited_over_white():
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black
    assert float(prepare_reference(clear).pixels.min()) == 1.0  # white, not black
