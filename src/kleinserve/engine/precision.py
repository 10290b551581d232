"""Where the weights live and in which dtype they compute.

CUDA computes in bf16. On the CPU the automatic choice is the fastest dtype: bf16 where the CPU has native
bf16 matmul instructions (AVX512_BF16 or AMX; oneDNN then runs bf16 at ~2x fp32), fp32 elsewhere (bf16 is
emulated there and ~4x slower). `--dtype float32` forces full precision, whose pixels match diffusers in fp32.

Linear layers on the CPU run through oneDNN with weights pre-packed once at load time
(`torch.ops.mkldnn._linear_pointwise`, the kernels Inductor uses with freezing), faster than the default
matmul in fp32 and in bf16 (README, Performance), where this CPU's oneDNN can pack the dtype (`can_pack`).

Storage: the published checkpoints are bf16, so a weight kept in bf16 and widened when used computes exactly
what the fp32 weight computes. When the packed weights would not fit the memory budget, the remaining Linear
layers keep their bf16 weights and widen them at each use (transformer layers are packed first: they run
once per step, the text encoder once per prompt). `Placer` applies this block by block while the loader
reads (engine/weights.py), so no block's stored weights outlive their packed copies.

Allocator (glibc): by default every buffer over 128 KiB-32 MiB (the threshold adapts) is a fresh mmap whose
pages fault in one by one on first touch, and freed heap memory over 128 KiB is handed back to the OS.
`keep_freed_memory()`, called once the model is loaded, keeps buffers up to 32 MiB in the heap and freed
memory in the process, so the next step, request or image reuses warm pages (the page faults saved: README,
Performance; tests/engine/test_allocator.py). Loading at 4B under either setting ends at the same peak RSS.

`--quantize fp8`: the transformer blocks' Linears become `Float8Linear` (engine/fp8.py; GPUs; CPU: tests).
On CUDA, `Placer` only moves modules (and quantizes fp8): no oneDNN packing, int8 or malloc tuning there.

`--quantize int8` (CPU) replaces the Linear layers of the transformer's and the text encoder's blocks by
`Int8Linear` (fbgemm's dynamic int8 kernels, as torch.ao's dynamic quantization); pixels drift from full
precision, and bench/engine.py reports by how much (PSNR). The int8 weights are kept on disk after the first
load (engine/prepared.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from kleinserve.engine.fp8 import Float8Linear, can_quantize
from kleinserve.engine.int8 import Int8Linear, Int8Source, Prepacker
from kleinserve.engine.weights import BLOCK_LISTS
from kleinserve.errors import InvalidInput

_GIB = 1 << 30
_HEADROOM_BYTES = 2 * _GIB  # activations, allocator slack, Python
# The automatic budget leaves 40 % of RAM to the rest of the machine. At 4B on a 24 GiB AVX2 machine
# (fp32 compute, bf16 weights), 75 % packed 2.2 B more weights as fp32 copies: peak RSS 18.8 GiB for
# 157 s per image, against 15.1 GiB for 167 s with a 14 GiB budget (README, Performance).
_MAX_RAM_FRACTION = 0.6
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
QUANTIZATIONS = (None, "int8", "fp8")
_PACK_HINT_ROWS = 1024  # oneDNN's blocking hint: tokens per call are in the hundreds to thousands


@dataclass(frozen=True)
class Placement:
    """Device and precision of a loaded model.

    `dtype` is the compute dtype; `quantize` is None, "int8" (CPU only) or "fp8" (GPUs with float8 tensor
    cores; the CPU for tests); `offload` keeps idle components on the CPU between uses (CUDA only);
    `memory_budget` is the bytes the weights may take (None: automatic); `compile`: the transformer's blocks
    are compiled (on the CPU their Linears then stay unpacked: Inductor could not lower oneDNN's packed
    Linear, "LoweringException: mkldnn._linear_pointwise", and packs weights its own way).
    """

    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None
    offload: bool = False
    memory_budget: int | None = None
    compile: bool = False  # the transformer's blocks compiled (engine/compiled.py)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def budget(self) -> int:
        if self.memory_budget is not None:
            return self.memory_budget
        memory = psutil.virtual_memory()
        return int(min(memory.available - _HEADROOM_BYTES, memory.total * _MAX_RAM_FRACTION))

    def with_budget_now(self) -> Placement:
        """This placement with its automatic budget measured now. The loader calls it before reading any
        weight: measured after, the available memory no longer counts the loaded weights, which the Placer
        subtracts again (at 4B that left no spare memory, and no Linear was packed: bench/engine.py)."""
        if self.memory_budget is not None:
            return self
        return dataclasses.replace(self, memory_budget=self.budget())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum: larger blocks (weights, big activations) stay mmaps
_TRIM_THRESHOLD_BYTES = 256 << 20  # free memory kept at the heap's top before it is returned


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for a long-running engine (module docstring); False where it is not glibc."""
    return _mallopt(_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES)


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    return bool(mmap_set and mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags as Linux names them (/proc/cpuinfo); empty elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def native_cpu_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512_BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def choose_placement(
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    offload: bool = False,
    memory_budget_gib: float | None = None,
    compile: bool = False,
) -> Placement:
    """Automatic choice (CUDA -> bf16; CPU -> its fastest dtype) with the user's overrides applied. Whether
    this machine can run it is `check_runnable`'s question."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:  # torch's parse error lists every device type it knows
        raise InvalidInput(
            f"unknown device {device!r}", param="device", allowed="cpu, cuda, cuda:N"
        ) from None
    if dtype is not None and dtype not in _DTYPES:
        raise InvalidInput(f"unknown dtype {dtype!r}", param="dtype", allowed=", ".join(sorted(_DTYPES)))
    if quantize not in QUANTIZATIONS:
        allowed = ", ".join(q for q in QUANTIZATIONS if q)
        raise InvalidInput(f"unknown quantization {quantize!r}", param="quantize", allowed=allowed)
    if quantize == "int8" and resolved.type != "cpu":
        raise InvalidInput("--quantize int8 is a CPU mode", param="quantize", allowed="with --device cpu")
    if resolved.type != "cpu":
        default = torch.bfloat16
    else:
        # int8 keeps fp32 activations; otherwise the CPU's fastest dtype.
        default = torch.bfloat16 if native_cpu_bf16() and quantize != "int8" else torch.float32
    budget = None if memory_budget_gib is None else int(memory_budget_gib * _GIB)
    return Placement(resolved, _DTYPES[dtype] if dtype else default, quantize, offload, budget, compile)


def check_runnable(placement: Placement) -> None:
    """InvalidInput when this machine cannot compute on `placement`'s device: a CUDA device torch does not see
    (or a torch built without CUDA), or a device type other than cpu/cuda. Called before any weight is read:
    loading would otherwise end in torch's AssertionError after seconds to minutes. Every dtype runs on every
    CPU: one whose oneDNN cannot pack it computes unpacked (`can_pack`)."""
    device = placement.device
    if device.type not in ("cpu", "cuda"):
        raise InvalidInput(f"device {device} is not supported", param="device", allowed="cpu, cuda, cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) < count:
            return
        if not torch.backends.cuda.is_built():
            why = f"this torch ({torch.__version__}) is built without CUDA"
        else:
            why = f"{count} CUDA device(s) visible"
        allowed = f"cuda:0-{count - 1} or cpu" if count else "cpu"
        raise InvalidInput(f"device {device} is not available: {why}", param="device", allowed=allowed)


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN pre-packs Linear weights of `dtype`: float32 everywhere; bfloat16 needs
    AVX512BW/VL/DQ or AVX_NE_CONVERT, float16 AVX512_FP16 or AVX_NE_CONVERT. torch has no flag for it, so one
    tiny weight is packed to find out (elsewhere packing raised "bf16 path needs the cpu support ..." and
    loading died; tests/engine/test_precision.py::test_weights_are_packed_where_the_cpu_can)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(1, 1, dtype=dtype), _PACK_HINT_ROWS)
    except RuntimeError:
        return False
    return True


def choose_load_dtype(placement: Placement, fp32_bytes: int, stored_16bit: bool) -> torch.dtype:
    """The dtype to read the checkpoint in: 16-bit when it is stored that way and fp32 would not fit (or int8
    quantization follows), so that no weight is ever rounded and loading never needs fp32 for everything."""
    if not placement.on_cpu or placement.dtype != torch.float32:
        return placement.dtype
    if stored_16bit and (placement.quantize or fp32_bytes > placement.budget()):
        return torch.bfloat16
    return torch.float32


class Placer:
    """Places a model's weights as weights.fill reads them: each repeated block as soon as it is in
    (`block`), then the rest of its module (`rest`), then the VAE (`vae`). The loader reads the transformer
    before the text encoder, so that when the memory budget runs short it is the transformer's layers, run at
    every step, that are packed (the text encoder runs once per prompt).

    `weight_bytes` is what every weight takes as read (before any packing or quantization): the budget's
    spare is what remains, and each packed copy larger than what it replaces is paid from it. With
    `quantize == "int8"`, `int8_weights` supplies each block Linear's int8 weight by name (prepared.Int8Cache:
    computed once, kept on disk), and fbgemm packs them in the background (int8.Prepacker): the layers are
    usable once `finish()` returned.
    """

    def __init__(
        self, placement: Placement, weight_bytes: int, int8_weights: Int8Source | None = None
    ) -> None:
        self.placement = placement
        self.spare = placement.budget() - weight_bytes
        self._int8 = int8_weights
        self._packer = Prepacker() if placement.on_cpu and placement.quantize == "int8" else None

    def provided(self, name: str) -> bool:
        """Whether the weight `name` (e.g. "transformer.transformer_blocks.0.attn.to_q.weight") comes from
        the int8 source, so that the loader need not read it."""
        if self._int8 is None or not name.endswith(".weight"):
            return False
        return self._int8.has(name.removesuffix(".weight"))

    def block(self, block: nn.Module, name: str) -> None:
        """Place one repeated block (`name`: its state-dict prefix with the component, e.g.
        "transformer.transformer_blocks.0"). Only the blocks are quantized: the embedders, modulation and
        output projections are a few % of the weights, but quantizing them costs far more PSNR than all the
        blocks do (README, Performance)."""
        float8 = self.placement.quantize == "fp8" and name.startswith("transformer.")
        if not self.placement.on_cpu:
            if not self.placement.offload:
                block.to(self.placement.device)
            if float8:  # on the GPU: quantizing there takes milliseconds, on the CPU seconds per GB
                self._float8(block)
            return
        if float8:
            self._float8(block)
        pack = not (self.placement.compile and name.startswith("transformer."))
        if self._packer is not None:
            for parent, attr, linear in _linears(block):
                before = _nbytes(linear)
                if self._int8 is None:
                    quantized = Int8Linear.quantize(linear, self._packer)
                else:
                    path = f"{name}.{_path(block, parent, attr)}"
                    quantized = self._int8.int8_linear(path, linear, self._packer)
                setattr(parent, attr, quantized)
                self.spare += before - quantized.nbytes
        self._compute_dtype(block, pack)

    def _float8(self, block: nn.Module) -> None:
        """Every Linear of `block` that suits the float8 GEMM to Float8Linear, quantized where it is; the
        biases in the compute dtype."""
        dtype = self.placement.dtype
        for parent, attr, linear in _linears(block):
            if can_quantize(linear):
                setattr(parent, attr, Float8Linear.quantize(linear, dtype))

    def module(self, module: nn.Module, component: str) -> None:
        """Place a module already in memory as the loader places one it reads: its blocks, then the rest
        (`component`: "transformer" or "text_encoder", as the names given to `block` begin)."""
        for list_name in BLOCK_LISTS:
            for index, block in enumerate(getattr(module, list_name, [])):
                self.block(block, f"{component}.{list_name}.{index}")
        self.rest(module)

    def finish(self) -> None:
        """Wait for the background packing (int8); the placed modules are usable once it returned."""
        if self._packer is not None:
            self._packer.finish()

    def rest(self, module: nn.Module) -> None:
        """Place what is outside `module`'s blocks (embedders, norms, projections)."""
        if not self.placement.on_cpu:
            if not self.placement.offload:
                module.to(self.placement.device)
            return
        self._compute_dtype(module)

    def vae(self, vae: nn.Module) -> None:
        if not self.placement.on_cpu:
            if not self.placement.offload:
                vae.to(self.placement.device)
        elif any(p.dtype != self.placement.dtype for p in vae.parameters()):
            vae.to(self.placement.dtype)

    def _compute_dtype(self, module: nn.Module, pack: bool = True) -> None:
        """Every Linear still plain below `module` packed (or widened when the packed copy does not fit the
        spare budget, or `pack` is False); the other parameters converted to the compute dtype."""
        dtype = self.placement.dtype
        _convert_other_parameters(module, dtype)
        for parent, attr, linear in _linears(module):
            extra = linear.weight.numel() * (dtype.itemsize - linear.weight.element_size())
            # extra == 0: the packed weight replaces the stored one, so it always fits.
            if pack and (extra == 0 or extra <= self.spare) and can_pack(dtype):
                setattr(parent, attr, PackedLinear(linear, dtype))
                self.spare -= extra
            else:
                setattr(parent, attr, WidenedLinear(linear))


def _path(root: nn.Module, parent: nn.Module, attr: str) -> str:
    """The dotted name of `parent.attr` below `root`."""
    for name, module in root.named_modules():
        if module is parent:
            return f"{name}.{attr}" if name else attr
    raise ValueError(f"{attr} is not below the given module")


class PackedLinear(nn.Module):
    """A bias-free or biased Linear whose weight is pre-packed for oneDNN in the compute dtype."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(dtype)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class WidenedLinear(nn.Module):
    """A Linear whose 16-bit weight stays 16-bit in memory and is widened to the input's dtype when used."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def _linears(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, Linear) for every nn.Linear below `module`, in module order.

    A generator on purpose: the caller replaces each Linear as it goes, and holding them all in a list would
    keep every original weight alive next to its converted copy (the whole model twice at the peak).
    """
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                yield parent, name, child


def _convert_other_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Everything that is not a Linear weight to the compute dtype (norm scales, buffers), except a 16-bit
    embedding table under fp32 compute, which stays 16-bit and has only its looked-up rows widened (the Qwen3
    table is 0.4 B values; widening the rows used is exact)."""
    for submodule in module.modules():
        if isinstance(submodule, LINEAR_KINDS):  # placed by the caller (a placed one is not touched again)
            continue
        if isinstance(submodule, nn.Embedding) and submodule.weight.dtype != dtype:
            if dtype == torch.float32 and submodule.weight.dtype in (torch.bfloat16, torch.float16):
                submodule.register_forward_hook(lambda _m, _i, output: output.float())
                continue
        for name, param in list(submodule.named_parameters(recurse=False)):
            if param.dtype != dtype:
                setattr(submodule, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))


# Every class a Linear may be once placed (lora_layers wraps any of them).
LINEAR_KINDS = (nn.Linear, PackedLinear, WidenedLinear, Int8Linear, Float8Linear)


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
