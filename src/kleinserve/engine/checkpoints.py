"""On-disk formats: safetensors headers, and BFL's single-file transformer checkpoint.

BFL names differ from diffusers names (model.md section 8). The conversion BFL -> diffusers is diffusers' own
`convert_flux2_transformer_checkpoint_to_diffusers`; the inverse below exists so that `create-tiny` can write
the single file the real repository ships. Easy to get wrong: BFL's final adaLN linear stores (shift, scale),
diffusers stores (scale, shift), so the halves swap (guarded by
tests/engine/test_loading.py::test_bfl_single_file_matches_diffusers_layout).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

from kleinserve.errors import ModelLoadError

# Present in every FLUX.2 transformer checkpoint in BFL naming (diffusers uses `.linear`).
BFL_MARKER_KEY = "single_stream_modulation.lin.weight"
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file ({name: {"dtype", "shape", "data_offsets"}}).

    Checked against the file size, so that a truncated or corrupt file fails here, naming the file, before any
    tensor is read.
    """
    return read_safetensors_table(path)[1]


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (checked as read_safetensors_header says)."""
    return read_safetensors_table(path)[2]


def read_safetensors_table(path: Path) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(offset of the data section in bytes, tensor table, metadata) of a safetensors file, checked as
    read_safetensors_header says; `data_offsets` count from the data section."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            f"{path}: truncated safetensors file "
            f"({size} bytes, the header describes {8 + header_len + data_end})"
        )
    return 8 + header_len, header, metadata


def count_parameters(header: dict[str, Any]) -> tuple[int, int]:
    """(number of values, bytes on disk) of the tensors in a safetensors header."""
    values = 0
    stored = 0
    for entry in header.values():
        n = 1
        for dim in entry["shape"]:
            n *= dim
        values += n
        stored += n * _DTYPE_BYTES.get(entry["dtype"], 4)
    return values, stored


def strip_bfl_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """BFL/ComfyUI checkpoints may carry a `model.diffusion_model.` prefix on every key."""
    for prefix in _BFL_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def is_bfl_transformer(keys: list[str]) -> bool:
    return any(key.removeprefix(p) == BFL_MARKER_KEY for key in keys for p in ("", *_BFL_PREFIXES))


def bfl_to_diffusers_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL single-file transformer keys -> `Flux2Transformer2DModel` keys (diffusers' converter)."""
    return convert_flux2_transformer_checkpoint_to_diffusers(strip_bfl_prefix(dict(state)))


def infer_bfl_transformer_config(header: dict[str, Any]) -> dict[str, Any]:
    """A `Flux2Transformer2DModel` config derived from the tensor shapes in a BFL checkpoint's header.

    Only rope_theta (2000) and the even split of head_dim over the four RoPE axes (t, h, w, l) are not
    visible in the shapes; both hold for every FLUX.2 checkpoint.
    """
    shapes = strip_bfl_prefix({key: entry["shape"] for key, entry in header.items()})
    width, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0] // 2

    def count(prefix: str) -> int:
        return len({key.split(".")[1] for key in shapes if key.startswith(prefix)})

    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": count("double_blocks."),
        "num_single_layers": count("single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "timestep_guidance_channels": shapes["time_in.in_layer.weight"][1],
        "mlp_ratio": mlp_hidden / width,
        "axes_dims_rope": (head_dim // 4,) * 4,
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }


def diffusers_to_bfl_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`Flux2Transformer2DModel` keys -> BFL single-file keys (the inverse of model.md section 8)."""
    renames = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
        "proj_out": "final_layer.linear",
    }
    double = {
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
        "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
        "attn.to_out.0.weight": "img_attn.proj.weight",
        "attn.to_add_out.weight": "txt_attn.proj.weight",
        "ff.linear_in.weight": "img_mlp.0.weight",
        "ff.linear_out.weight": "img_mlp.2.weight",
        "ff_context.linear_in.weight": "txt_mlp.0.weight",
        "ff_context.linear_out.weight": "txt_mlp.2.weight",
    }
    single = {
        "attn.to_qkv_mlp_proj.weight": "linear1.weight",
        "attn.to_out.weight": "linear2.weight",
        "attn.norm_q.weight": "norm.query_norm.scale",
        "attn.norm_k.weight": "norm.key_norm.scale",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("transformer_blocks."):
            _, index, rest = key.split(".", 2)
            if rest in ("attn.to_q.weight", "attn.add_q_proj.weight"):
                stream = "img" if rest == "attn.to_q.weight" else "txt"
                names = (
                    ("to_q", "to_k", "to_v")
                    if stream == "img"
                    else ("add_q_proj", "add_k_proj", "add_v_proj")
                )
                parts = [state[f"transformer_blocks.{index}.attn.{name}.weight"] for name in names]
                out[f"double_blocks.{index}.{stream}_attn.qkv.weight"] = torch.cat(parts, dim=0)
            elif rest in double:
                out[f"double_blocks.{index}.{double[rest]}"] = value
        elif key.startswith("single_transformer_blocks."):
            _, index, rest = key.split(".", 2)
            out[f"single_blocks.{index}.{single[rest]}"] = value
        elif key == "norm_out.linear.weight":
            scale, shift = value.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], dim=0)
        else:
            name, param = key.rsplit(".", 1)
            out[f"{renames[name]}.{param}"] = value
    return out
