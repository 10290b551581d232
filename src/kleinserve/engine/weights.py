"""Weights read one tensor at a time, straight into the storage they keep, and placed block by block.

Why not the libraries' `from_pretrained`: at 4B it read every shard into a bytes object, copied each tensor
out of it, and only then could the weights be packed or quantized, so the whole checkpoint existed twice or
more at the peak (the Qwen3 text encoder: 9.6 GiB peak RSS for 6 GiB of weights) and every byte was copied
into freshly faulted pages two or three times (README, Performance). Here a model is built on the meta
device (parameters only: non-persistent buffers such as Qwen3's rotary frequencies are computed as usual),
each parameter is read with one positioned read (os.preadv) from the file into its own tensor, and each
repeated block is handed to `after_block` (precision.Placer: pack, widen or quantize) as soon as its weights
are in, so the peak is the placed model plus one block as stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import init_empty_weights
from torch import nn

from kleinserve.engine import checkpoints
from kleinserve.errors import ModelLoadError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "layers")  # Flux2 doubles/singles, Qwen3


class TensorSource(Protocol):
    """Named tensors as a checkpoint holds them (names as the module's state dict spells them)."""

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape, None when the checkpoint has no such tensor."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, in memory of its own."""
        ...


@dataclass(frozen=True)
class _Stored:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int


class SafetensorsFiles:
    """The tensors of safetensors files, each key renamed by `rename` (None drops it: tensors the model does
    not load, such as the text encoder's layers past the last one read)."""

    def __init__(self, files: list[Path], rename: Callable[[str], str | None] = lambda key: key) -> None:
        self._stored: dict[str, _Stored] = {}
        for file in files:
            data_start, header, _ = checkpoints.read_safetensors_table(file)
            for key, entry in header.items():
                name = rename(key)
                if name is None:
                    continue
                if entry["dtype"] not in _DTYPES:
                    raise ModelLoadError(f"{file}: tensor {key} has an unsupported dtype {entry['dtype']}")
                begin, end = entry["data_offsets"]
                self._stored[name] = _Stored(
                    file, _DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin, end - begin
                )

    def shape(self, name: str) -> tuple[int, ...] | None:
        stored = self._stored.get(name)
        return None if stored is None else stored.shape

    def read(self, name: str) -> torch.Tensor:
        stored = self._stored[name]
        raw = torch.empty(stored.nbytes, dtype=torch.uint8)
        view = raw.numpy().data
        with stored.file.open("rb", buffering=0) as handle:
            done = 0
            while done < stored.nbytes:
                count = os.preadv(handle.fileno(), [view[done:]], stored.offset + done)
                if count <= 0:
                    raise ModelLoadError(f"{stored.file}: truncated while reading {name}")
                done += count
        return raw.view(stored.dtype).reshape(stored.shape)


class StateDict:
    """A state dict already in memory as a TensorSource; each tensor is dropped once read, so that the
    dictionary does not keep the stored copy alive next to the placed one."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = dict(state)

    def shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self._state.get(name)
        return None if tensor is None else tuple(tensor.shape)

    def read(self, name: str) -> torch.Tensor:
        return self._state.pop(name)


def empty_model(build: Callable[[], Any]) -> Any:
    """`build()` with its parameters on the meta device and its buffers computed (no weight initialised)."""
    with init_empty_weights(include_buffers=False):
        model = build()
    return model.eval().requires_grad_(False)


def fill(
    model: nn.Module,
    source: TensorSource,
    dtype: torch.dtype,
    where: Path,
    after_block: Callable[[nn.Module, str], None],
    after_rest: Callable[[nn.Module], None],
    skip: Callable[[str], bool] = lambda name: False,
) -> None:
    """Read every meta parameter and buffer of `model` from `source` in `dtype` (stored values are never
    rounded: see choose_load_dtype): first what is outside the repeated blocks, then each block, handed to
    `after_block(block, its state-dict prefix)` as soon as it is complete; `after_rest(model)` then places
    what is outside the blocks. A tensor missing from `source`, or of another shape, is a ModelLoadError
    naming `where`. Block tensors for which `skip(name)` holds are not read: they stay on the meta device
    for `after_block` to replace (int8 weights that come from the prepared file)."""
    in_blocks = tuple(f"{name}." for name in BLOCK_LISTS)
    _read([t for t in _meta_tensors(model) if not t[2].startswith(in_blocks)], source, dtype, where)
    for list_name in BLOCK_LISTS:
        for index, block in enumerate(getattr(model, list_name, [])):
            wanted = [t for t in _meta_tensors(block, f"{list_name}.{index}.") if not skip(t[2])]
            _read(wanted, source, dtype, where)
            after_block(block, f"{list_name}.{index}")
    after_rest(model)


def _meta_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[nn.Module, str, str]]:
    """(owning module, attribute, state-dict name) of each meta parameter or buffer below `module`."""
    for module_name, owner in module.named_modules():
        tensors = {**dict(owner.named_parameters(recurse=False)), **dict(owner.named_buffers(recurse=False))}
        for attr, tensor in tensors.items():
            if tensor.is_meta:
                yield owner, attr, prefix + (f"{module_name}.{attr}" if module_name else attr)


def _read(
    targets: list[tuple[nn.Module, str, str]], source: TensorSource, dtype: torch.dtype, where: Path
) -> None:
    wrong = []
    for owner, attr, name in targets:
        expected = tuple(getattr(owner, attr).shape)
        if source.shape(name) != expected:
            wrong.append(name)
            continue
        value = source.read(name)
        if value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value
    if wrong:
        raise missing_weights(where, wrong)


def missing_weights(where: Path, names: list[str]) -> ModelLoadError:
    """The error for weights a checkpoint lacks or holds in another shape, naming up to three."""
    shown = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return ModelLoadError(f"{where}: weights missing or of the wrong shape for {shown}")
