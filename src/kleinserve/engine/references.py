"""Reference images for editing: checks, resizing, cropping and VAE encoding (model.md section 6).

Per reference, as diffusers' Flux2KleinPipeline does it (the processor is diffusers' own Flux2ImageProcessor):
both sides >= 64 px and aspect ratio <= 8; if larger than 1024*1024 pixels, resized to that area (LANCZOS,
int truncation); floored to multiples of 16 by a centre crop (no resize); RGB in [-1, 1]; VAE-encoded alone
(batch 1), the distribution's mean taken, patchified, BatchNorm-normalised and packed. References are never
noised; their tokens follow the target's in the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from kleinserve.engine import latents as L
from kleinserve.engine.spec import SIZE_MULTIPLE
from kleinserve.errors import InvalidInput

MAX_REFERENCE_AREA = 1024 * 1024
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8

_processor = Flux2ImageProcessor(vae_scale_factor=SIZE_MULTIPLE)


@dataclass(frozen=True)
class PreparedReference:
    """A reference after resizing and cropping: `pixels` (1, 3, H, W) in [-1, 1], H and W multiples of 16.
    `source` is the image it was prepared from, as 8-bit RGB at its given size; `image` the prepared 8-bit RGB
    image `pixels` are made from (W x H): what a job stores, so that `restore_reference` gives the same pixels
    after a restart without preparing it again."""

    pixels: torch.Tensor
    source: Image.Image
    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.pixels.shape[3], self.pixels.shape[2]

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of its token grid."""
        return self.pixels.shape[2] // SIZE_MULTIPLE, self.pixels.shape[3] // SIZE_MULTIPLE


def prepare_reference(image: Image.Image, index: int = 0) -> PreparedReference:
    """Check, resize and crop one reference image (any PIL mode; converted to RGB first)."""
    check_reference(image, index)
    # Conversion before resizing: diffusers converts after, which is the same for RGB input and makes
    # palette/CMYK/16-bit images resize as colours rather than as indices or raw channels.
    source = to_rgb(image)
    return _prepared(source, source)


def check_reference(image: Image.Image, index: int) -> None:
    """InvalidInput naming `reference_images[index]` unless both sides are >= 64 px and the aspect <= 8."""
    width, height = image.size
    param = f"reference_images[{index}]"
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise InvalidInput(
            f"reference image {index} is {width}x{height}", param=param, allowed="both sides >= 64 px"
        )
    if max(width / height, height / width) > MAX_REFERENCE_ASPECT:
        raise InvalidInput(
            f"reference image {index} is {width}x{height}", param=param, allowed="aspect ratio up to 8:1"
        )


def restore_reference(image: Image.Image) -> PreparedReference:
    """A reference as `prepare_reference` left it (its `image`, read back from a lossless file), with nothing
    checked: resizing and cropping leave a prepared image as it is, so its pixels are the ones it had. An
    image stored unprepared (a job queued by an older version kept its source) is prepared here."""
    rgb = to_rgb(image)
    return _prepared(rgb, rgb)


def _prepared(rgb: Image.Image, source: Image.Image) -> PreparedReference:
    """Resize `rgb` to MAX_REFERENCE_AREA if larger, centre-crop it to multiples of 16, make its pixels."""
    width, height = rgb.size
    image = rgb
    if width * height > MAX_REFERENCE_AREA:
        image = _processor._resize_to_target_area(image, MAX_REFERENCE_AREA)
        width, height = image.size
    width -= width % SIZE_MULTIPLE
    height -= height % SIZE_MULTIPLE
    # The crop diffusers' preprocess(resize_mode="crop") makes, done here so that the image stored is the
    # one the pixels come from; preprocess then crops nothing more.
    return reference_from_image(_processor._resize_and_crop(image, width, height), source)


def reference_from_image(image: Image.Image, source: Image.Image | None = None) -> PreparedReference:
    """The reference whose prepared image is `image` (8-bit RGB, sides multiples of 16), made from `source`
    (default: `image` itself)."""
    width, height = image.size
    pixels = _processor.preprocess(image, height=height, width=width, resize_mode="crop")
    return PreparedReference(pixels=pixels, source=image if source is None else source, image=image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit grey scaled (PIL's own convert clips it to white), transparency
    composited over white (dropping alpha would reveal whatever colour hides under transparent pixels)."""
    if image.mode.startswith("I;16") or (image.mode == "I" and _brightest(image) > 255):
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _brightest(image: Image.Image) -> int:
    """The largest value of a one-band image (its getextrema() is (min, max))."""
    _, high = image.getextrema()
    return int(cast(int, high))


@torch.inference_mode()
def encode_references(
    references: list[PreparedReference], vae: AutoencoderKLFlux2, dtype: torch.dtype
) -> torch.Tensor:
    """(1, sum h_i*w_i, C) normalised reference tokens, in reference order."""
    mean, std = latent_statistics(vae)
    device = next(vae.parameters()).device
    tokens = []
    for reference in references:
        moments = vae.encode(reference.pixels.to(device=device, dtype=dtype)).latent_dist
        latent = L.patchify(moments.mode())  # (1, C, h, w)
        tokens.append(L.pack(L.normalize(latent, mean.to(latent), std.to(latent))))
    return torch.cat(tokens, dim=1)


def vae_latents(packed: torch.Tensor, vae: AutoencoderKLFlux2, h: int, w: int) -> torch.Tensor:
    """Packed normalised tokens (B, h*w, C) -> the VAE's own latents (B, C/4, 2h, 2w) in fp32, ready to
    decode: the inverse of encode_references' pack(normalize(patchify(.)))."""
    mean, std = latent_statistics(vae)
    return L.unpatchify(L.denormalize(L.unpack(packed.float(), h, w), mean.float(), std.float()))


def latent_statistics(vae: AutoencoderKLFlux2) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's BatchNorm running mean and std (sqrt(var + eps)) over patchified channels, each (C,)."""
    mean = vae.bn.running_mean
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
    return mean, std
