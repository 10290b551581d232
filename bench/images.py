"""The pixel comparisons benchmarks print between two images of the same prompt and seed: the largest
difference in 0-255 levels and the PSNR in dB, on the (H, W, 3) arrays `pixels` reads."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def pixels(image: Any) -> np.ndarray:
    """(H, W, 3) float64 RGB levels of a PIL image, or of the image file at a path."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"), dtype=np.float64)
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(abs(a - b).max())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
