"""Inpainting and image-to-image (a request's `mask` / `strength`), as diffusers' Flux2KleinInpaintPipeline
makes them, inside the one denoise loop (engine/sampling.py) rather than as a second pipeline.

With either, `reference_images[0]` is the image edited. Each step below is that pipeline's, done with its own
image processors (tests/engine/test_inpaint.py compares pixels):
- the image edited: above 1024*1024 px resized to that area (`(int(h*s), int(w*s))`), sides floored to
  multiples of 16 and resized (not cropped: resize_mode "default") to them; the output has that size. It is
  also the first reference (t = 10): the pipeline conditions on the image it edits.
- the other references, as the pipeline's `image_reference` list: each resized and centre-cropped to the size
  the FIRST of them gets (its own 1 MP cap and floor to 16). Flux2KleinPipeline, without a mask, keeps each
  reference's own size; the inpainting pipeline batches them, so they share one.
- the mask ("L", the edited image's size; >= 128 repaints): resized to the output size and binarised at 0.5 by
  the mask processor; the engine then interpolates it bilinearly to the token grid (fractional along edges).
- strength s over N steps: the loop runs the timesteps from `start_step(N, s) = int(max(N - min(N*s, N), 0))`,
  starting from sigma * noise + (1 - sigma) * x0 at that step's sigma (1.0 at s = 1: the noise itself), x0 the
  edited image's latents; after every step the kept region is put back: x = (1 - m) * noised(x0, next sigma)
  + m * x, and x0 itself after the last step. Without a mask, m = 1 everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from kleinserve.engine import latents as L
from kleinserve.engine.references import (
    MAX_REFERENCE_AREA,
    PreparedReference,
    check_reference,
    reference_from_image,
    to_rgb,
)
from kleinserve.engine.spec import SIZE_MULTIPLE
from kleinserve.errors import InvalidInput

MASK_THRESHOLD = 128  # "L" mask pixels at or above it are repainted (the mask processor binarises at 0.5)

_images = Flux2ImageProcessor(vae_scale_factor=SIZE_MULTIPLE)
_masks = Flux2ImageProcessor(
    vae_scale_factor=SIZE_MULTIPLE,
    do_normalize=False,
    do_binarize=True,
    do_convert_rgb=False,
    do_convert_grayscale=True,
)


@dataclass(frozen=True)
class EditPlan:
    """What a mask or strength adds to a request. `mask` is (1, 1, H, W) of 0.0/1.0 at the output size (1:
    repaint; None: repaint everything), `mask_image` the same as an "L" image of 0/255 (what a job stores)."""

    strength: float
    mask: torch.Tensor | None
    mask_image: Image.Image | None

    def start_step(self, steps: int) -> int:
        """The index of the first of `steps` timesteps run (diffusers' get_timesteps): 0 at strength 1."""
        return int(max(steps - min(steps * self.strength, steps), 0))

    def mask_tokens(self, h: int, w: int) -> torch.Tensor | None:
        """(1, h*w, 1) the mask on the token grid (h, w), packed; None without a mask."""
        if self.mask is None:
            return None
        return L.pack(F.interpolate(self.mask, size=(h, w), mode="bilinear"))


def plan_edit(
    images: tuple[Image.Image, ...], mask: Image.Image | None, strength: float | None
) -> tuple[tuple[PreparedReference, ...], EditPlan]:
    """Check and prepare an edit: the references (the edited image first) and the plan. InvalidInput naming
    `mask` or `strength` for a mask without an image, of another size than the image or marking nothing to
    repaint, and a strength outside (0, 1]; `reference_images[i]` for an unusable image."""
    param = "mask" if mask is not None else "strength"
    if not images:
        raise InvalidInput(
            f"{param} needs an image to edit", param=param, allowed="a first reference image (the one edited)"
        )
    if strength is not None:
        numeric = isinstance(strength, int | float) and not isinstance(strength, bool)
        if not numeric or not 0 < strength <= 1:  # NaN fails the comparison
            raise InvalidInput(
                f"strength {strength!r} is out of range", param="strength", allowed="0 < s <= 1"
            )
    if mask is not None and mask.size != images[0].size:
        raise InvalidInput(
            f"the mask is {mask.size[0]}x{mask.size[1]}, the image {images[0].size[0]}x{images[0].size[1]}",
            param="mask",
            allowed="a mask of exactly the first image's size",
        )
    for index, image in enumerate(images):
        check_reference(image, index)
    references = prepare_edit_references(images)
    width, height = references[0].size
    mask_pixels = None if mask is None else _masks.preprocess(mask, height=height, width=width)
    if mask_pixels is not None and not bool(mask_pixels.any()):
        raise InvalidInput(
            "the mask marks nothing to repaint",
            param="mask",
            allowed="a mask with pixels to repaint (OpenAI: fully transparent; otherwise white)",
        )
    return references, EditPlan(
        strength=1.0 if strength is None else float(strength),
        mask=mask_pixels,
        mask_image=None if mask_pixels is None else _mask_image(mask_pixels),
    )


def prepare_edit_references(images: tuple[Image.Image, ...]) -> tuple[PreparedReference, ...]:
    """The edited image and the other references, prepared as the inpainting pipeline prepares `image` and
    `image_reference` (module docstring). Idempotent: a job's stored (prepared) images give the same
    pixels."""
    sources = [to_rgb(image) for image in images]
    edited = _within_area(sources[0])
    width, height = _floored(edited.size)
    edited = _images.resize(edited, height, width)  # resize_mode "default": stretched to the floored sides
    prepared = [reference_from_image(edited, sources[0])]
    others = sources[1:]
    if others:
        target = _within_area(others[0]).size  # the size the first of them gets
        scaled = others
        if target != others[0].size:  # above 1 MP, each is resized to it before the crop, as the first is
            scaled = [_images.resize(image, target[1], target[0]) for image in others]
        width, height = _floored(target)
        prepared.extend(
            reference_from_image(_images._resize_and_crop(image, width, height), source)
            for image, source in zip(scaled, others, strict=True)
        )
    return tuple(prepared)


def _within_area(image: Image.Image) -> Image.Image:
    """`image` resized to MAX_REFERENCE_AREA if larger, as the pipeline does it: (int(h*s), int(w*s))."""
    width, height = image.size
    if width * height <= MAX_REFERENCE_AREA:
        return image
    scale = math.sqrt(MAX_REFERENCE_AREA / (width * height))
    return _images.resize(image, int(height * scale), int(width * scale))


def _floored(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    return width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE


def _mask_image(mask: torch.Tensor) -> Image.Image:
    """(1, 1, H, W) of 0/1 -> an "L" image of 0/255, which the mask processor reads back unchanged."""
    return Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8), mode="L")


@dataclass(frozen=True)
class KnownLatents:
    """The batch's edited images as the denoise loop keeps them (rows are images, B of them; under CFG the
    loop sees the B images once: guidance combines its doubled batch before the step). `clean` (B, N, C) the
    edited images' latents x0 (the first reference's tokens), `noise` (B, N, C) each image's own noise, `mask`
    (B, N, 1) 1 where it repaints, `starts` (B,) each image's first step (its strength), `sigmas` the
    schedule's N + 1 sigmas."""

    clean: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor
    starts: torch.Tensor
    sigmas: torch.Tensor

    @property
    def first_step(self) -> int:
        return int(self.starts.min())

    def initial(self) -> torch.Tensor:
        """x at the first step: each row noised to its own start's sigma (the noise itself at strength 1)."""
        sigma = self.sigmas.to(self.clean.dtype)[self.starts].view(-1, 1, 1)
        return sigma * self.noise + (1.0 - sigma) * self.clean

    def after_step(self, index: int, before: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
        """x after schedule step `index`: a row that has not started yet keeps `before`; a started row keeps
        its known region, noised to the next sigma (clean after the last step), and the step elsewhere."""
        if index + 1 < len(self.sigmas) - 1:
            sigma = self.sigmas.to(self.clean.dtype)[index + 1]
            known = sigma * self.noise + (1.0 - sigma) * self.clean
        else:
            known = self.clean
        blended = (1 - self.mask) * known + self.mask * stepped
        started = (self.starts <= index).view(-1, 1, 1)
        return torch.where(started, blended, before)
