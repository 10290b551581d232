"""Prepared weights: the int8 quantization of a model, computed once and kept on disk beside it.

What loading computes, and what of it can be kept:
- int8 weights and their scales (`--quantize int8`): the observer and rounding pass over every block Linear.
  Kept here, in one safetensors file per model and key.
- oneDNN's packed layouts (PackedLinear) and fbgemm's packed int8 matrices (Int8Linear): opaque tensors that
  torch can neither serialize nor rebuild from bytes, so they are made again at each load (their cost is in
  README, Performance).

Where: `<model dir>/.kleinserve/` when the model's directory is writable, else kleinserve's cache directory
(`prepared/<digest of the model's path>/`). The file's name holds the key: the SHA-256 of every transformer
and text-encoder weight file, torch's version, this format's version and the CPU's instruction-set flags. A
key that changed (new weights, a torch upgrade, another CPU) names another file, so a stale file is never read
(it is deleted once the new one is written). Each tensor carries its CRC-32 in the header, checked as it is
read: a corrupt file is dropped and rebuilt from the weights, never used. Files are written to a temporary
name, fsynced and renamed, so a crash leaves no half-written cache.

Hashing the weights (~1.6 GB/s) is done once per file: digests are remembered by path, size, mtime and inode
(`digests.json` beside the cache), as git's index remembers file contents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from kleinserve.engine import checkpoints
from kleinserve.engine.int8 import Int8Linear, Prepacker
from kleinserve.engine.precision import cpu_flags
from kleinserve.engine.weights import SafetensorsFiles
from kleinserve.errors import ModelLoadError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_HASH_CHUNK = 16 << 20


class DamagedPreparedWeights(Exception):
    """A prepared file whose header was sound holds a tensor that is not what was written."""


@dataclass(frozen=True)
class PreparedWeights:
    """Where a load's prepared weights are, and whether that load wrote them (it had to quantize)."""

    path: Path
    written: bool


class Int8Cache:
    """The int8 weights of one model (precision.Int8Source): read from `path` when it holds them, else
    quantized, and then written there by `save`."""

    def __init__(self, path: Path, key: dict[str, str]) -> None:
        """Reads the header of `path` if it exists; a file that is not ours, or of another key, is ignored
        (and replaced by `save`)."""
        self.path = path
        self.key = key
        self.missed = 0  # Linears quantized now rather than read
        self._stored: SafetensorsFiles | None = None
        self._crcs: dict[str, str] = {}
        if path.exists():
            self._open()

    def _open(self) -> None:
        try:
            metadata = checkpoints.read_safetensors_metadata(self.path)
            if json.loads(metadata.get("key", "null")) != self.key:
                raise ValueError("its key differs from these weights'")
            self._crcs = json.loads(metadata["crc32"])
            self._stored = SafetensorsFiles([self.path])
        except (ModelLoadError, OSError, ValueError, KeyError) as exc:  # any damage: rebuilt, never used
            log.warning("%s: unusable prepared weights (%s); quantizing again", self.path, exc)
            self._stored = None

    def has(self, name: str) -> bool:
        return self._stored is not None and self._stored.shape(f"{name}.weight") is not None

    def int8_linear(self, name: str, linear: nn.Linear, packer: Prepacker) -> Int8Linear:
        """`linear` as an Int8Linear: its int8 weight read from the file when `has(name)` (the loader then
        leaves `linear.weight` unread, on the meta device), else quantized from `linear.weight`. A kept
        weight of another shape or checksum raises DamagedPreparedWeights: the loader starts again without
        the file."""
        if not self.has(name):
            self.missed += 1
            return Int8Linear.quantize(linear, packer)
        assert self._stored is not None  # has() said so
        weight = self._stored.read(f"{name}.weight")
        scale = self._stored.read(f"{name}.scale")
        if tuple(weight.shape) != tuple(linear.weight.shape) or _crc(weight, scale) != self._crcs.get(name):
            raise DamagedPreparedWeights(f"{self.path}: {name} does not match its shape or checksum")
        qweight = torch._make_per_tensor_quantized_tensor(weight, float(scale[0]), 0)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return Int8Linear(qweight, bias, packer)

    def save(self, components: dict[str, nn.Module]) -> PreparedWeights:
        """Write the file when any Linear was quantized now (missing, stale or damaged file). The int8
        weights are unpacked from the loaded modules and written one at a time (no second copy of them all);
        `components` maps component names, as the names given to `int8_linear` begin, to modules."""
        if not self.missed:
            return PreparedWeights(self.path, written=False)
        linears = [
            (f"{component}.{name}", module)
            for component, root in components.items()
            for name, module in root.named_modules()
            if isinstance(module, Int8Linear)
        ]
        _write_int8(self.path, linears, {"key": json.dumps(self.key, sort_keys=True)})
        for stale in self.path.parent.glob("int8-*.safetensors"):
            if stale != self.path:
                stale.unlink(missing_ok=True)
        return PreparedWeights(self.path, written=True)


def open_int8_cache(model_dir: Path, weight_files: list[Path], cache_root: Path) -> Int8Cache:
    """The int8 cache for a model whose transformer and text-encoder weights are `weight_files`."""
    folder = _folder(model_dir, cache_root)
    digests = _Digests(folder / "digests.json")
    key = {
        "format": str(FORMAT_VERSION),
        "torch": torch.__version__,
        "cpu": " ".join(sorted(cpu_flags())),
        "weights": json.dumps([digests.of(file) for file in weight_files]),
    }
    digests.save()
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Int8Cache(folder / f"int8-{name}.safetensors", key)


def _folder(model_dir: Path, cache_root: Path) -> Path:
    beside = model_dir / ".kleinserve"
    with contextlib.suppress(OSError):
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    folder = cache_root / "prepared" / digest
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _Digests:
    """SHA-256 of files, remembered by (size, mtime, inode) in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changed = False
        try:
            self.known: dict[str, dict[str, object]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def of(self, file: Path) -> str:
        stat = file.stat()
        identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self.known.get(str(file.resolve()))
        if entry is not None and entry.get("identity") == identity:
            return str(entry["sha256"])
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        self.known[str(file.resolve())] = {"identity": identity, "sha256": digest.hexdigest()}
        self.changed = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.changed:
            with contextlib.suppress(OSError), _replacing(self.path) as handle:
                handle.write(json.dumps(self.known, indent=1).encode())


def _crc(weight: torch.Tensor, scale: torch.Tensor) -> str:
    crc = zlib.crc32(weight.contiguous().view(torch.uint8).numpy().data)
    return f"{zlib.crc32(scale.numpy().tobytes(), crc):08x}"


def _write_int8(path: Path, linears: list[tuple[str, Int8Linear]], metadata: dict[str, str]) -> None:
    """A safetensors file of `<name>.weight` (int8, (out, in)) and `<name>.scale` (float64, (1,)) per Linear,
    the CRC-32s in the header's metadata. Written in one pass: the header goes first with placeholder CRCs of
    the same width, and is written again at the end with the real ones."""
    header: dict[str, object] = {}
    offset = 0
    for name, module in linears:
        size = module.out_features * module.in_features
        header[f"{name}.weight"] = {
            "dtype": "I8",
            "shape": [module.out_features, module.in_features],
            "data_offsets": [offset, offset + size],
        }
        header[f"{name}.scale"] = {
            "dtype": "F64",
            "shape": [1],
            "data_offsets": [offset + size, offset + size + 8],
        }
        offset += size + 8
    crcs = dict.fromkeys((name for name, _ in linears), "0" * 8)

    def encoded() -> bytes:
        text = json.dumps({**header, "__metadata__": {**metadata, "crc32": json.dumps(crcs)}}).encode()
        return text + b" " * (-len(text) % 8)  # the data section starts 8-byte aligned

    first = encoded()
    with _replacing(path) as handle:
        handle.write(struct.pack("<Q", len(first)) + first)
        for name, module in linears:
            qweight = module.weight_and_bias()[0]
            if qweight.q_zero_point() != 0:  # symmetric quantization: always 0
                raise ValueError(f"{name}: int8 zero point {qweight.q_zero_point()}, expected 0")
            weight = qweight.int_repr()
            scale = torch.tensor([qweight.q_scale()], dtype=torch.float64)
            crcs[name] = _crc(weight, scale)
            handle.write(weight.view(torch.uint8).numpy().data)
            handle.write(scale.numpy().tobytes())
        final = encoded()
        if len(final) != len(first):
            raise AssertionError("the header changed length")  # fixed-width CRCs: cannot happen
        handle.seek(8)
        handle.write(final)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """A new file that replaces `path` when the block ends without an exception, flushed and fsynced first;
    written under a temporary name, so a crash or an error leaves `path` as it was and no partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
