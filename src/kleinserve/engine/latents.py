"""Latent layouts and position ids: pure tensor functions, one per layout change.

Shapes: B batch, C = 4 * vae latent channels (128 for klein), h, w = pixel size / 16.

Easy to get wrong (guarded by tests/engine/test_fidelity.py):
- noise is drawn directly in the packed-channel space, (1, C, h, w) per image, from a CPU torch.Generator
  seeded with that image's seed, in fp32; the same seed gives the same image on every device and batch size;
- patchify is 2x2 with channel index c*4 + pi*2 + pj; pack is row-major (h outer, w inner);
- position ids are (t, h, w, l): target t=0; text (0, 0, 0, l) for l in 0..L-1; reference i (0-based)
  t = 10 + 10*i with its own h, w grid and no spatial offset;
- the transformer sees the sequence [text | target | ref 1 | ref 2 ...] (text first; the model concatenates
  text itself) and reads only batch item 0 of the ids, so a batch must share size and reference geometry.
"""

from __future__ import annotations

import torch

REFERENCE_T_SCALE = 10  # reference i sits at t = 10 + 10 * i (BFL `encode_image_refs`, diffusers `scale`)


def draw_noise(seeds: list[int], channels: int, h: int, w: int) -> torch.Tensor:
    """(B, C, h, w) fp32 noise, item i from `torch.Generator("cpu").manual_seed(seeds[i])`."""
    return torch.cat(
        [
            torch.randn((1, channels, h, w), generator=torch.Generator("cpu").manual_seed(seed))
            for seed in seeds
        ]
    )


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, c, 2h, 2w) VAE latents -> (B, 4c, h, w); channel = c*4 + pi*2 + pj."""
    b, c, height, width = latents.shape
    latents = latents.view(b, c, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, height // 2, width // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4c, h, w) -> (B, c, 2h, 2w); the inverse of `patchify`."""
    b, c4, h, w = latents.shape
    latents = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major tokens."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w); the inverse of `pack` (tokens are in row-major id order)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """(h*w, 4) ids (t, row, column, 0) in pack order."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.tensor([0]))


def text_ids(length: int) -> torch.Tensor:
    """(length, 4) ids (0, 0, 0, position)."""
    return torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.arange(length))


def reference_ids(grids: list[tuple[int, int]]) -> torch.Tensor:
    """(sum h_i*w_i, 4) ids of references with latent grids [(h_i, w_i)], reference i at t = 10 + 10*i."""
    if not grids:
        return torch.zeros((0, 4), dtype=torch.long)
    return torch.cat(
        [image_ids(h, w, t=REFERENCE_T_SCALE + REFERENCE_T_SCALE * i) for i, (h, w) in enumerate(grids)]
    )


def normalize(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """BatchNorm-style latent normalisation of patchified latents (B, C, h, w); mean/std are (C,)."""
    return (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def denormalize(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return latents * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
