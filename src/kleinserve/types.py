"""kleinserve's internal vocabulary: what every dialect translates to and from.

Data flows one way: dialect -> GenerateRequest -> engine -> GenerateResult -> dialect.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import orjson
import pybase64
from PIL import Image

from kleinserve.errors import InvalidInput

# The largest seed a request may give. Image i of a request uses seed + i, which must stay a signed 64-bit
# integer (the noise generator's seed) for up to 8 images: twice MAX_IMAGES_PER_REQUEST, so that raising that
# limit does not move this bound, which every dialect publishes in its schema.
MAX_SEED = 2**63 - 8


# Names clients use for a format beside its own (OpenAI and the AI Gateway take "jpg").
_FORMAT_ALIASES = {"jpg": "jpeg"}


class ImageFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @classmethod
    def parse(cls, name: str, param: str = "output_format") -> ImageFormat:
        """The format a wire name means, in any letter case, aliases included ("jpg" is JPEG); InvalidInput
        naming `param` for any other name."""
        name = name.lower()
        try:
            return cls(_FORMAT_ALIASES.get(name, name))
        except ValueError:
            raise InvalidInput(f"{param} {name!r}", param=param, allowed="png, jpeg, webp") from None

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA adapter a request applies: `adapter` is the name of a file in the server's adapter folder
    (`--lora-dir`, without `.safetensors`) or `sha256:<hex>` of a downloaded one (engine/lora.py resolves
    both); `scale` multiplies its delta (-4 to 4; 0 turns it off)."""

    adapter: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerateRequest:
    """One text-to-image or editing request, already in kleinserve's units.

    `width`/`height` are pixels; None means "the first reference image's processed size, else 1024".
    `steps`/`guidance` None mean the loaded variant's defaults. A variant with fixed guidance (distilled
    klein) ignores `guidance` always; `fixed_by_variant` says whether it also ignores `steps`: True for the
    dialects whose hosted API fixes the distilled model's steps (BFL, Cloudflare, the AI Gateway), False
    where a caller may still ask for another step count (OpenAI's `num_inference_steps`, the CLI).
    `seed` (0-MAX_SEED) None draws a random seed; image i of `num_images` uses seed + i, so every image can
    be regenerated alone. `reference_images` are decoded PIL images in any mode (converted to RGB by the
    engine).

    Inpainting and image-to-image (engine/inpaint.py): with `mask` or `strength`, `reference_images[0]` is the
    image edited (and still a reference, as in diffusers' Flux2KleinInpaintPipeline); the output has its size.
    `mask` is an "L" image of exactly that size whose pixels >= 128 are repainted and < 128 kept (diffusers'
    convention; each dialect converts its own, e.g. OpenAI's transparent pixels to 255). `strength`
    (0 < s <= 1; None: 1.0 with a mask) is how far from the image denoising starts: 1.0 from pure noise, lower
    keeps more of it. `strength` without `mask` repaints the whole image.
    """

    prompt: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 1
    reference_images: tuple[Image.Image, ...] = ()
    negative_prompt: str = ""
    max_sequence_length: int | None = None  # prompt tokens; None: the model's own (512 for klein)
    output_format: ImageFormat = ImageFormat.PNG
    output_quality: int | None = None
    fixed_by_variant: bool = False
    loras: tuple[LoraChoice, ...] = ()  # at most 4; each image equals diffusers' with these adapters set
    mask: Image.Image | None = None  # "L", the size of reference_images[0]; >= 128: repaint
    strength: float | None = None  # 0 < s <= 1; None: 1.0 with a mask, no image-to-image without one


@dataclass(frozen=True)
class GeneratedImage:
    """One output image and the seed that reproduces it alone."""

    image: Image.Image
    seed: int

    def encode(self, fmt: ImageFormat = ImageFormat.PNG, quality: int | None = None) -> bytes:
        return encode_image(self.image, fmt, quality)


def encode_image(image: Image.Image, fmt: ImageFormat = ImageFormat.PNG, quality: int | None = None) -> bytes:
    """The image as PNG/JPEG/WebP bytes; `quality` 1-100 applies to JPEG and WebP (default 90)."""
    buffer = io.BytesIO()
    if fmt is ImageFormat.PNG:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=fmt.value.upper(), quality=90 if quality is None else quality)
    return buffer.getvalue()


def json_bytes(value: object) -> bytes:
    """Compact UTF-8 JSON, as every JSON answer, server-sent event, webhook body and stored JSON column is
    written. orjson rather than the json module: one C call, ~40x faster for a body carrying an image
    (README, Performance: what the per-request overhead is made of)."""
    return orjson.dumps(value)


def base64_text(data: bytes) -> str:
    """Standard base64 of `data`, as the wire formats carry images. pybase64 (SIMD) rather than the standard
    library: ~60x faster, on every image answer (README, Performance)."""
    return pybase64.b64encode_as_string(data)


@dataclass(frozen=True)
class GenerateResult:
    """What the engine made for one GenerateRequest: the images and the parameters actually used."""

    images: tuple[GeneratedImage, ...]
    width: int
    height: int
    steps: int
    guidance: float
    prompt_tokens: int  # tokens the text encoder read for the prompt (chat template included, padding not)
    reference_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each reference as processed
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds, shared by the batch


@dataclass(frozen=True)
class Progress:
    """Reported after each denoising step: `step` counts from 1 to `total_steps`.

    `preview()` decodes the model's current estimate of the clean image, one PIL image per image of the batch,
    in batch order. It runs the VAE on the engine's thread, so call it only for the steps you show.
    """

    step: int
    total_steps: int
    seconds: float  # the engine's time for this step: model call and scheduler step, no callbacks
    preview: Callable[[], list[Image.Image]] = field(default=lambda: [], repr=False, compare=False)


StepCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]
