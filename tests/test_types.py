"""Output encoding: the bytes decode back to the image (exactly for PNG); base64 as the wire carries it."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from kleinserve.types import GeneratedImage, ImageFormat, base64_text
from tests.conftest import max_difference, random_image


@pytest.mark.parametrize(
    ("fmt", "pil_name", "exact"),
    [
        (ImageFormat.PNG, "PNG", True),
        (ImageFormat.JPEG, "JPEG", False),
        (ImageFormat.WEBP, "WEBP", False),
    ],
)
def test_encode_gives_decodable_bytes_of_the_format(fmt, pil_name, exact):
    image = GeneratedImage(random_image(80, 48, seed=2), seed=1)
    data = image.encode(fmt)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == pil_name and decoded.size == (80, 48)
    assert fmt.media_type == f"image/{fmt.value}"
    if exact:
        assert max_difference(decoded, image.image) == 0


def test_quality_changes_lossy_size():
    image = GeneratedImage(random_image(64, 64, seed=3), seed=1)
    assert len(image.encode(ImageFormat.JPEG, quality=30)) < len(image.encode(ImageFormat.JPEG, quality=95))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 57, 197_000])
def test_base64_text_is_standard_padded_base64(size: int) -> None:
    data = random.Random(size).randbytes(size)
    text = base64_text(data)
    assert text == base64.b64encode(data).decode("ascii")
    assert base64.b64decode(text, validate=True) == data
