"""Tiny LoRA adapters for the tiny model (engine/tiny.py), written with the real key names of each format
diffusers' FLUX.2 loader reads, so that tests go through its converters as users' files do.

    shapes = linear_shapes(transformer)
    projections = lora_projections(shapes, edges=True)
    factors = random_lora(shapes, projections, rank=4, seed=1)
    write_lora(folder / "ink.safetensors", factors, projections, "kohya")

An adapter is made per BFL projection: A (rank, in) and B (out, rank), where BFL's fused projections (qkv of
a double block) are split evenly into diffusers' layers (to_q, to_k, to_v), all sharing A. Written so, each
format says exactly the same adapter after diffusers' conversion:
- "diffusers": `transformer.<layer>.lora_A.weight` / `lora_B.weight` (with `alpha`: diffusers' metadata header
  `lora_adapter_metadata`, which PEFT reads as `lora_alpha`);
- "bfl": `diffusion_model.<projection>.lora_A.weight` / `lora_B.weight` (AI-toolkit's names, B fused);
- "kohya": `lora_unet_<projection with _>.lora_down.weight` / `lora_up.weight` / `.alpha`, alpha = rank / 2
  and lora_down = 2 A, so that diffusers' alpha / rank multiplication gives A back exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from safetensors.torch import save_file

from kleinserve.errors import InvalidInput

# (BFL name in a double block, diffusers layers below `transformer_blocks.<i>.`)
_DOUBLE = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.linear_in",)),
    ("img_mlp.2", ("ff.linear_out",)),
    ("txt_mlp.0", ("ff_context.linear_in",)),
    ("txt_mlp.2", ("ff_context.linear_out",)),
)
_SINGLE = (("linear1", ("attn.to_qkv_mlp_proj",)), ("linear2", ("attn.to_out",)))
# Outside the blocks, the layers all three formats name (kohya has no modulation layers).
_EDGES = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)

LoraFormat = Literal["diffusers", "bfl", "kohya"]


@dataclass(frozen=True)
class Projection:
    """One adapted projection: its BFL name and the diffusers layers its output is split into."""

    bfl: str
    layers: tuple[str, ...]

    @property
    def kohya(self) -> str:
        return "lora_unet_" + self.bfl.replace(".", "_")


def lora_projections(shapes: Mapping[str, tuple[int, int]], edges: bool = False) -> list[Projection]:
    """Every attention and MLP projection of the blocks in `shapes` (`linear_shapes` of a transformer), and
    with `edges` the embedders and the output projection too."""
    doubles = sum(f"transformer_blocks.{i}.attn.to_q" in shapes for i in range(len(shapes)))
    singles = sum(f"single_transformer_blocks.{i}.attn.to_out" in shapes for i in range(len(shapes)))
    projections = [
        Projection(f"double_blocks.{i}.{name}", tuple(f"transformer_blocks.{i}.{layer}" for layer in layers))
        for i in range(doubles)
        for name, layers in _DOUBLE
    ]
    projections += [
        Projection(
            f"single_blocks.{i}.{name}", tuple(f"single_transformer_blocks.{i}.{layer}" for layer in layers)
        )
        for i in range(singles)
        for name, layers in _SINGLE
    ]
    if edges:
        projections += [Projection(name, (layer,)) for name, layer in _EDGES]
    return projections


def random_lora(
    shapes: Mapping[str, tuple[int, int]],
    projections: Sequence[Projection],
    rank: int,
    seed: int,
    strength: float = 0.5,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random fp32 factors per projection (BFL name -> (A, B fused)), deterministic in `seed`; `strength`
    is the delta's size relative to a unit-variance input."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for projection in projections:
        features_in = shapes[projection.layers[0]][0]
        features_out = sum(shapes[layer][1] for layer in projection.layers)
        a = torch.randn(rank, features_in, generator=generator) / features_in**0.5
        b = torch.randn(features_out, rank, generator=generator) * strength / rank**0.5
        factors[projection.bfl] = (a, b)
    return factors


def write_lora(
    path: Path,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    projections: Sequence[Projection],
    convention: LoraFormat,
    alpha: float | None = None,
) -> Path:
    """Write `factors` (`random_lora`) in `convention` (module docstring); `alpha` (diffusers format only)
    is PEFT's lora_alpha, a scale of alpha / rank. Returns `path`."""
    if alpha is not None and convention != "diffusers":
        raise InvalidInput(
            "alpha is written as diffusers' metadata", param="alpha", allowed="diffusers format"
        )
    tensors: dict[str, torch.Tensor] = {}
    metadata = None
    for projection in projections:
        a, b = factors[projection.bfl]
        rank = a.shape[0]
        if convention == "bfl":
            tensors[f"diffusion_model.{projection.bfl}.lora_A.weight"] = a
            tensors[f"diffusion_model.{projection.bfl}.lora_B.weight"] = b
        elif convention == "kohya":
            tensors[f"{projection.kohya}.lora_down.weight"] = a * 2
            tensors[f"{projection.kohya}.lora_up.weight"] = b
            tensors[f"{projection.kohya}.alpha"] = torch.tensor(rank / 2)
        else:
            for layer, part in zip(projection.layers, b.chunk(len(projection.layers)), strict=True):
                tensors[f"transformer.{layer}.lora_A.weight"] = (
                    a.clone()
                )  # safetensors stores no shared tensors
                tensors[f"transformer.{layer}.lora_B.weight"] = part.contiguous()
    if alpha is not None:
        layers = sorted({layer for projection in projections for layer in projection.layers})
        config = {"r": rank, "lora_alpha": alpha, "target_modules": layers}
        metadata = {LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
