"""LoRA adapter files: names, reading through diffusers' own converters, checks, an LRU cache by bytes.

    library = AdapterLibrary(Path("loras"), downloads=Path("cache/loras"), cache_bytes=1 << 30)
    library.names()                      # [AdapterInfo(name="ink", format="kohya", rank=16, ...), ...]
    ref = library.add(downloaded_bytes)  # "sha256:<hex>", stored under downloads/<hex>.safetensors
    library.check("ink")                 # InvalidInput (param "loras") naming the adapter and the problem

An adapter is a file stem in the folder (`--lora-dir`; a name never leaves it: no '/', '\\', '..') or
`sha256:<hex>` of a file `add` stored. Files are read the way diffusers'
`Flux2KleinPipeline.load_lora_weights` reads them: `Flux2LoraLoaderMixin.lora_state_dict` turns kohya/ComfyUI
(`lora_unet_*.lora_down`), BFL / AI-toolkit (`diffusion_model.*`) and PEFT (`base_model.model.*`) keys into
diffusers' `transformer.*.lora_A/B` (kohya's alpha / rank already multiplied in), and PEFT's scale
`lora_alpha / r` (rsLoRA: `/ sqrt(r)`) comes from diffusers' `lora_adapter_metadata` header as PEFT reads it
(`rank_pattern`, `alpha_pattern`); without that header diffusers sets alpha = rank per layer, a scale of 1.
diffusers adapts the transformer only, so text-encoder keys are refused (diffusers would drop them
silently), as are keys it would not load.

Scaled out, the process that downloads an adapter (`kleinserve api`) is not the one that applies it
(`kleinserve worker`): with `shared` (the object store every process of the deployment uses) `add` also puts
the file at `loras/<hex>.safetensors` there, and a `sha256:` name missing from `downloads` is fetched from it.

Bound to a model (`ModelLayers`, as the engine's library is) the library also checks every factor's shape
against the layer it adapts, and `load` gives the factors in the compute dtype on the compute device (PEFT
casts them to the base layer's dtype the same way), kept in an LRU cache bounded by their bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from kleinserve.errors import EngineError, InvalidInput, NotFound
from kleinserve.objects import ObjectStore

MAX_LORAS = 4  # adapters per request
MAX_LORA_SCALE = 4.0  # |scale| per adapter
MAX_LORA_RANK = 256  # per adapted layer; published FLUX LoRAs are rank 4-128
DEFAULT_LORA_CACHE_BYTES = 2 << 30
LORA_DOWNLOADS = "loras"  # <data dir>/loras/: the servers' downloaded adapters, named by their content hash
HASH_PREFIX = "sha256:"
_SUFFIX = ".safetensors"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FACTOR_KEY = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")
_TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")  # diffusers' and kohya's text-encoder key prefixes
_PEFT_DEFAULT_RANK = 8  # LoraConfig's r and lora_alpha where diffusers' metadata leaves them out

AdapterFormat = Literal["diffusers", "kohya", "bfl"]
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInfo:
    """What `GET /v1/loras` shows of one adapter: `targets` are the adapted layers (diffusers module names of
    the transformer), `rank` the largest rank among them, `bytes` the file's size."""

    name: str
    format: AdapterFormat
    rank: int
    targets: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class ModelLayers:
    """What adapters are checked and placed against: the transformer's Linear layers, name ->
    (in_features, out_features), and the dtype and device they compute in."""

    shapes: Mapping[str, tuple[int, int]]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter ready to compute: per layer `factors` (A (rank, in), B (out, rank)) in the compute dtype
    on the compute device, and PEFT's `scaling` (alpha / rank) where it is not 1; `nbytes` of the factors."""

    name: str
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: Mapping[str, float]
    nbytes: int


@dataclass(frozen=True)
class _ReadAdapter:
    """A file read and converted to diffusers' keys, checked apart from any model; factors as stored."""

    format: AdapterFormat
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]

    @property
    def shapes(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        return {module: (a.shape, b.shape) for module, (a, b) in self.factors.items()}


@dataclass(frozen=True)
class _Summary:
    """What describing and checking an adapter needs of its file, without the tensors."""

    format: AdapterFormat
    shapes: dict[str, tuple[torch.Size, torch.Size]]  # layer -> (lora_A shape, lora_B shape)


class AdapterLibrary:
    """The adapters a server can apply (module docstring). Thread-safe: requests are checked on API threads
    while the engine thread loads."""

    def __init__(
        self,
        folder: Path | None,
        downloads: Path,
        cache_bytes: int = DEFAULT_LORA_CACHE_BYTES,
        *,
        model: ModelLayers | None = None,
        shared: ObjectStore | None = None,
    ) -> None:
        if folder is not None and not folder.is_dir():
            raise InvalidInput(
                f"{folder} is not a directory", param="lora_dir", allowed="a folder of adapters"
            )
        self.folder = folder
        self.downloads = downloads
        self.cache_bytes = cache_bytes
        self.model = model
        self.shared = shared
        self._cache: OrderedDict[tuple[str, int, int], LoadedAdapter] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def names(self) -> list[AdapterInfo]:
        """The folder's usable adapters by name; a file that cannot be used is logged and left out."""
        if self.folder is None:
            return []
        infos = []
        for path in sorted(self.folder.glob(f"*{_SUFFIX}")):
            try:
                infos.append(self.describe(path.name.removesuffix(_SUFFIX)))
            except InvalidInput as error:
                _log.warning("adapter folder: %s", error.message)
        return infos

    def describe(self, adapter: str) -> AdapterInfo:
        """`adapter`'s format, rank, targets and size; InvalidInput if it is missing or cannot be used."""
        path = self.path(adapter)
        stat = path.stat()
        summary = _summarize(str(path), stat.st_mtime_ns, stat.st_size, adapter)
        if self.model is not None:
            _check_fits(summary.shapes, self.model, adapter)
        rank = max(a[0] for a, _ in summary.shapes.values())
        return AdapterInfo(adapter, summary.format, rank, tuple(sorted(summary.shapes)), stat.st_size)

    def check(self, adapter: str) -> None:
        """InvalidInput unless `adapter` exists and can be used (on this model, where bound); a bound library
        loads it into the cache, where the engine finds it."""
        if self.model is not None:
            self.load(adapter)
        else:
            self.describe(adapter)

    def add(self, data: bytes) -> str:
        """Check a downloaded adapter file and keep it as downloads/<sha256>.safetensors (once per content;
        and in `shared`); returns its name, "sha256:<hex>". InvalidInput naming the problem if unusable."""
        digest = hashlib.sha256(data).hexdigest()
        if (self.downloads / f"{digest}{_SUFFIX}").is_file():
            return HASH_PREFIX + digest  # kept (and shared) when first added: no second upload
        self._keep(digest, data, check=True)
        if self.shared is not None:
            self.shared.put(_shared_key(digest), data)
        return HASH_PREFIX + digest

    def _keep(self, digest: str, data: bytes, check: bool) -> Path:
        """Write `data` as downloads/<digest>.safetensors, read and checked first where `check`."""
        final = self.downloads / f"{digest}{_SUFFIX}"
        self.downloads.mkdir(parents=True, exist_ok=True)
        # Written beside its final name and renamed once checked: a reader never sees half a file.
        handle, partial = tempfile.mkstemp(dir=self.downloads, prefix=f".{digest}.", suffix=".part")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        try:
            if check:
                read = _read(Path(partial), HASH_PREFIX + digest)
                if self.model is not None:
                    _check_fits(read.shapes, self.model, HASH_PREFIX + digest)
            os.replace(partial, final)
        finally:
            Path(partial).unlink(missing_ok=True)
        return final

    def path(self, adapter: str) -> Path:
        """The file `adapter` names; InvalidInput (param "loras") for a name outside the folder or missing."""
        if adapter.startswith(HASH_PREFIX):
            digest = adapter.removeprefix(HASH_PREFIX)
            if not _DIGEST.fullmatch(digest):
                raise _bad_name(adapter, "sha256: takes 64 lowercase hex digits")
            path = self.downloads / f"{digest}{_SUFFIX}"
            if not path.is_file() and self.shared is not None:
                try:  # added by another process of the deployment; checked when read, as any file
                    path = self._keep(digest, self.shared.get(_shared_key(digest)), check=False)
                except NotFound:
                    pass
        elif self.folder is None:
            raise InvalidInput(
                f"no adapter {adapter!r}: this server has no adapter folder",
                param="loras",
                allowed="sha256:<hex> of an adapter given by URL",
            )
        else:
            if not adapter or adapter.startswith(".") or any(c in adapter for c in "/\\\0"):
                raise _bad_name(
                    adapter, "a file name in the adapter folder, without '/', '\\' or a leading '.'"
                )
            path = self.folder / f"{adapter}{_SUFFIX}"
        if not path.is_file():
            raise InvalidInput(f"no adapter {adapter!r}", param="loras", allowed="names from GET /v1/loras")
        return path

    def load(self, adapter: str) -> LoadedAdapter:
        """`adapter` ready to compute on the bound model, from the cache or read now (and cached, evicting the
        least recently used adapters beyond `cache_bytes`). InvalidInput as `check`; EngineError unbound."""
        if self.model is None:
            raise EngineError("an adapter library without a model cannot load adapters")
        path = self.path(adapter)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)  # a replaced file is read again
        with self._lock:
            loaded = self._cache.get(key)
            if loaded is not None:
                self._cache.move_to_end(key)
                return loaded
            read = _read(path, adapter)
            _check_fits(read.shapes, self.model, adapter)
            loaded = _place(read, self.model, adapter)
            self._cache[key] = loaded
            self._cached_bytes += loaded.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
            return loaded


def _shared_key(digest: str) -> str:
    return f"loras/{digest}{_SUFFIX}"


def _bad(
    adapter: str, problem: str, allowed: str = "a FLUX.2 transformer LoRA diffusers can load"
) -> InvalidInput:
    return InvalidInput(f"adapter {adapter!r} {problem}", param="loras", allowed=allowed)


def _bad_name(adapter: str, allowed: str) -> InvalidInput:
    return InvalidInput(f"adapter name {adapter!r} is not allowed", param="loras", allowed=allowed)


def _some(keys: Iterable[str], count: int = 3) -> str:
    """A few of `keys` for a message, and how many there are in all."""
    keys = sorted(keys)
    shown = ", ".join(keys[:count])
    return shown if len(keys) <= count else f"{shown} and {len(keys) - count} more"


@functools.lru_cache(maxsize=1024)
def _summarize(path: str, mtime_ns: int, size: int, adapter: str) -> _Summary:
    """`_read`'s format and shapes, once per file version (a listing reads every file of the folder)."""
    read = _read(Path(path), adapter)
    return _Summary(read.format, read.shapes)


def _read(path: Path, adapter: str) -> _ReadAdapter:
    """Read and convert one file (module docstring); InvalidInput naming `adapter` and the problem."""
    try:
        with safe_open(str(path), "pt") as file:
            header = file.metadata() or {}
        raw = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise _bad(adapter, f"is not a safetensors file ({error})") from None
    if not raw:
        raise _bad(adapter, "holds no tensors")
    text_encoder = [key for key in raw if key.startswith(_TEXT_ENCODER_PREFIXES)]
    if text_encoder:
        raise _bad(
            adapter,
            f"has text-encoder keys ({_some(text_encoder)}): diffusers' FLUX.2 LoRA loading adapts the "
            "transformer only",
        )
    if any(".lokr_" in key for key in raw):
        raise _bad(adapter, "is a LoKr adapter", allowed="LoRA adapters")
    # diffusers drops DoRA scales itself (with a warning); dropped here first, every key left in `work` after
    # diffusers' kohya converter (which pops each key it maps) is one it does not know.
    work = {key: tensor for key, tensor in raw.items() if "dora_scale" not in key}
    format_ = _format(work)
    try:
        converted = Flux2LoraLoaderMixin.lora_state_dict(work)
    except (ValueError, KeyError, IndexError, RuntimeError) as error:
        raise _bad(adapter, f"cannot be read by diffusers' FLUX.2 LoRA loader: {str(error)[:300]}") from None
    if format_ == "kohya" and work:
        raise _bad(adapter, f"has unknown keys ({_some(work)})")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in converted.items():
        match = _FACTOR_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
        else:
            pairs.setdefault(match["module"], {})[match["factor"]] = tensor
    if unknown:
        raise _bad(adapter, f"has keys diffusers' FLUX.2 LoRA loader does not load ({_some(unknown)})")
    factors = {}
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise _bad(adapter, f"has only one of lora_A and lora_B for {module}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or not a.is_floating_point():
            shapes = f"lora_A {tuple(a.shape)} {a.dtype}, lora_B {tuple(b.shape)} {b.dtype}"
            raise _bad(adapter, f"has factors of {module} that are no LoRA pair ({shapes})")
        if a.shape[0] > MAX_LORA_RANK:
            raise _bad(
                adapter,
                f"has rank {a.shape[0]} at {module}, over this server's cap",
                allowed=f"rank at most {MAX_LORA_RANK}",
            )
        factors[module] = (a, b)
    return _ReadAdapter(format_, factors, _peft_scaling(header, factors, adapter))


def _format(state: Mapping[str, Any]) -> AdapterFormat:
    """The key convention, tested in the order diffusers' Flux2LoraLoaderMixin.lora_state_dict tests it."""
    if any(".lora_down.weight" in key for key in state):
        return "kohya"
    if any(key.startswith(("diffusion_model.", "base_model.model.")) for key in state):
        return "bfl"
    return "diffusers"


def _peft_scaling(
    header: Mapping[str, str], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], adapter: str
) -> dict[str, float]:
    """PEFT's per-layer scale where it is not 1, from diffusers' metadata header as `load_lora_adapter`
    reads it: the `transformer.`-prefixed entries are a LoraConfig (r and lora_alpha default to 8); a layer's
    rank and alpha are `rank_pattern`/`alpha_pattern`'s first key matching its name, else `r`/`lora_alpha`."""
    if LORA_ADAPTER_METADATA_KEY not in header:
        return {}  # diffusers' get_peft_kwargs: alpha = rank for every layer
    try:
        stored = json.loads(header[LORA_ADAPTER_METADATA_KEY])
        config = {
            k.removeprefix("transformer."): v for k, v in stored.items() if k.startswith("transformer.")
        }
        rank, alpha = config.get("r", _PEFT_DEFAULT_RANK), config.get("lora_alpha", _PEFT_DEFAULT_RANK)
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora", False))
        if config.get("use_dora"):
            raise _bad(adapter, "is a DoRA adapter", allowed="LoRA adapters")
        scaling = {}
        for module, (a, _) in factors.items():
            module_rank = rank_pattern.get(_pattern_key(rank_pattern, module), rank)
            module_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, module), alpha)
            if module_rank != a.shape[0]:
                problem = (
                    f"says rank {module_rank} for {module} in its metadata, its factors have {a.shape[0]}"
                )
                raise _bad(adapter, problem)
            scale = module_alpha / math.sqrt(module_rank) if rslora else module_alpha / module_rank
            if scale != 1.0:
                scaling[module] = float(scale)
    except (ValueError, TypeError, AttributeError) as error:
        raise _bad(adapter, f"has unreadable {LORA_ADAPTER_METADATA_KEY} ({error})") from None
    return scaling


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern matching the end of `module` at a dot boundary."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return module


def _check_fits(
    shapes: Mapping[str, tuple[torch.Size, torch.Size]], model: ModelLayers, adapter: str
) -> None:
    """InvalidInput unless every adapted layer exists in `model` with the factors' widths."""
    missing = [module for module in shapes if module not in model.shapes]
    if missing:
        raise _bad(adapter, f"adapts layers this model does not have ({_some(missing)})")
    for module, (a, b) in shapes.items():
        features_in, features_out = model.shapes[module]
        if a[1] != features_in or b[0] != features_out:
            raise _bad(
                adapter,
                f"does not fit this model: {module} maps {features_in} to {features_out} features, the "
                f"adapter's lora_A is {tuple(a)} and lora_B {tuple(b)}",
                allowed="a LoRA trained on this FLUX.2 [klein] variant",
            )


def _place(read: _ReadAdapter, model: ModelLayers, adapter: str) -> LoadedAdapter:
    """The factors in the model's compute dtype and device, as PEFT casts them to the base layer's."""
    factors = {
        module: (a.to(model.device, model.dtype), b.to(model.device, model.dtype))
        for module, (a, b) in read.factors.items()
    }
    nbytes = sum(t.numel() * t.element_size() for pair in factors.values() for t in pair)
    return LoadedAdapter(adapter, factors, read.scaling, nbytes)
