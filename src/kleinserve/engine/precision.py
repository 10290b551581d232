"""Where the weights live and in which dtype they compute.

CUDA computes in bf16. On the CPU, bf16 matmuls run ~4x slower than fp32 on CPUs without native bf16 kernels
(measured in bench/engine.py), so the CPU always computes in fp32. Storage is a separate choice: the
published checkpoints are bf16, so a weight kept in bf16 and widened to fp32 at each use computes exactly what
the fp32 weight would. When all weights do not fit the memory budget in fp32, whole blocks stay bf16-stored
(transformer blocks are widened first: they run once per step, the text encoder once per prompt).

`--quantize int8` (CPU) replaces the Linear layers of the transformer and the text encoder by dynamically
quantized int8 ones (torch.ao, fbgemm/onednn kernels using VNNI); pixels drift from full precision and
bench/engine.py reports by how much (PSNR).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import torch
from torch import nn
from torch.nn.utils import parametrize

_GIB = 1 << 30
_HEADROOM_BYTES = 2 * _GIB  # activations, allocator slack, Python
_MAX_RAM_FRACTION = 0.75


@dataclass(frozen=True)
class Placement:
    """Device and precision of a loaded model.

    `dtype` is the compute dtype; `quantize` is None or "int8" (CPU only); `offload` keeps idle components on
    the CPU between uses (CUDA only); `memory_budget` is the bytes the weights may take (None: automatic).
    """

    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None
    offload: bool = False
    memory_budget: int | None = None

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def budget(self) -> int:
        if self.memory_budget is not None:
            return self.memory_budget
        memory = psutil.virtual_memory()
        return int(min(memory.available - _HEADROOM_BYTES, memory.total * _MAX_RAM_FRACTION))


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def choose_placement(
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    offload: bool = False,
    memory_budget_gib: float | None = None,
) -> Placement:
    """Automatic choice (CUDA -> bf16; CPU -> fp32 compute) with the user's overrides applied."""
    from kleinserve.errors import InvalidInput

    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is not None and dtype not in _DTYPES:
        raise InvalidInput(f"unknown dtype {dtype!r}", param="dtype", allowed=", ".join(sorted(_DTYPES)))
    if quantize not in (None, "int8"):
        raise InvalidInput(f"unknown quantization {quantize!r}", param="quantize", allowed="int8")
    if quantize and resolved.type != "cpu":
        raise InvalidInput("--quantize int8 is a CPU mode", param="quantize", allowed="with --device cpu")
    default = torch.float32 if resolved.type == "cpu" else torch.bfloat16
    budget = None if memory_budget_gib is None else int(memory_budget_gib * _GIB)
    return Placement(resolved, _DTYPES[dtype] if dtype else default, quantize, offload, budget)


def choose_load_dtype(placement: Placement, fp32_bytes: int, stored_16bit: bool) -> torch.dtype:
    """The dtype to read the checkpoint in: bf16 when it is stored that way and fp32 would not fit (or
    int8 quantization follows), so that no weight is ever rounded."""
    if not placement.on_cpu or placement.dtype != torch.float32:
        return placement.dtype
    if stored_16bit and (placement.quantize or fp32_bytes > placement.budget()):
        return torch.bfloat16
    return torch.float32


def place_modules(
    placement: Placement, *, text_encoder: nn.Module, transformer: nn.Module, vae: nn.Module
) -> None:
    """Move and convert the loaded modules in place (see the module docstring for the policy)."""
    if not placement.on_cpu:
        if not placement.offload:
            for module in (text_encoder, transformer, vae):
                module.to(placement.device)
        return
    vae.float()
    if placement.quantize == "int8":
        for block in (*_blocks(transformer), *_blocks(text_encoder)):
            block.float()
            torch.ao.quantization.quantize_dynamic(block, {nn.Linear}, dtype=torch.qint8, inplace=True)
        _widen_all_but_blocks(transformer)
        _widen_all_but_blocks(text_encoder)
        return
    if placement.dtype != torch.float32:
        return
    _widen_all_but_blocks(transformer)
    _widen_all_but_blocks(text_encoder)
    spare = placement.budget() - sum(_nbytes(m) for m in (text_encoder, transformer, vae))
    for block in (*_blocks(transformer), *_blocks(text_encoder)):
        extra = _nbytes(block)  # bf16 -> fp32 doubles the block
        if _is_16bit(block) and extra <= spare:
            block.float()
            spare -= extra
        elif _is_16bit(block):
            _compute_in_fp32(block)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The repeated blocks that hold nearly all weights: transformer blocks or Qwen3 decoder layers."""
    for name in ("transformer_blocks", "single_transformer_blocks", "layers"):
        yield from getattr(module, name, [])


def _widen_all_but_blocks(module: nn.Module) -> None:
    """fp32 for everything outside the blocks, except a 16-bit embedding table, which stays 16-bit and has its
    looked-up rows widened (the full Qwen3 table is 0.4 B values; widening only the rows used is exact)."""
    blocks = {id(b) for b in _blocks(module)}
    for child in module.children():
        if isinstance(child, nn.ModuleList) and all(id(b) in blocks for b in child):
            continue
        if isinstance(child, nn.Embedding) and child.weight.dtype != torch.float32:
            child.register_forward_hook(lambda _m, _i, output: output.float())
            continue
        child.float()
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(param.float(), requires_grad=False))


class _WidenToFloat32(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float()


def _compute_in_fp32(block: nn.Module) -> None:
    """Keep the block's Linear weights 16-bit in memory and widen each to fp32 when it is used."""
    for submodule in block.modules():
        if isinstance(submodule, nn.Linear):
            parametrize.register_parametrization(submodule, "weight", _WidenToFloat32(), unsafe=True)
    for submodule in block.modules():
        if not isinstance(submodule, nn.Linear | parametrize.ParametrizationList):
            for name, param in list(submodule.named_parameters(recurse=False)):
                setattr(submodule, name, nn.Parameter(param.float(), requires_grad=False))


def _is_16bit(module: nn.Module) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in module.parameters())


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
