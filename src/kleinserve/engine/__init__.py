"""The engine: model loading and generation. Knows nothing of HTTP, queues or wire formats.

from kleinserve.engine import load_pipeline
pipeline = load_pipeline("tiny-random")

The rest of kleinserve sees a loaded pipeline only as an `Engine` (engine/protocol.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from kleinserve.engine.compiled import compile_blocks
from kleinserve.engine.components import ModelComponents, load_components
from kleinserve.engine.loading import cache_dir, inspect_source, resolve_source
from kleinserve.engine.lora import DEFAULT_LORA_CACHE_BYTES, AdapterLibrary, ModelLayers
from kleinserve.engine.lora_layers import linear_shapes
from kleinserve.engine.pipeline import Pipeline
from kleinserve.engine.precision import check_runnable, choose_placement, keep_freed_memory
from kleinserve.engine.resolve import SpecResolver
from kleinserve.engine.text import DEFAULT_CACHE_BYTES, PromptEmbeddingCache
from kleinserve.objects import ObjectStore


def load_pipeline(
    model: str,
    *,
    components: str | None = None,
    download: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    offload: bool = False,
    memory_budget_gib: float | None = None,
    compile: bool = False,
    prompt_cache_bytes: int = DEFAULT_CACHE_BYTES,
    lora_dir: Path | None = None,
    lora_downloads: Path | None = None,
    lora_cache_bytes: int = DEFAULT_LORA_CACHE_BYTES,
    lora_shared: ObjectStore | None = None,
) -> Pipeline:
    """Resolve `model` (directory, BFL file, HF repo id or `tiny-random`), load it, wrap it in a Pipeline
    (`pipeline_from_components`: `compile` compiles the transformer's blocks, engine/compiled.py). On the
    CPU, also tunes the process's allocator for the engine, once loaded (precision.keep_freed_memory).

    With `lora_dir` (named adapters) or `lora_downloads` (where `AdapterLibrary.add` keeps downloaded ones;
    default: kleinserve's cache), requests may apply LoRA adapters (engine/lora.py), whose factors are cached
    up to `lora_cache_bytes`; scaled out, `lora_shared` is the deployment's object store, where the API
    processes put the adapters they download (AdapterLibrary)."""
    source = resolve_source(model, components=components, download=download)
    placement = choose_placement(device, dtype, quantize, offload, memory_budget_gib, compile)
    check_runnable(placement)  # before reading any weight
    loaded = load_components(source, placement)
    adapters = None
    if lora_dir is not None or lora_downloads is not None:
        layers = ModelLayers(linear_shapes(loaded.transformer), placement.dtype, placement.device)
        downloads = lora_downloads or cache_dir() / "lora-downloads"
        adapters = AdapterLibrary(lora_dir, downloads, lora_cache_bytes, model=layers, shared=lora_shared)
    return pipeline_from_components(loaded, PromptEmbeddingCache(prompt_cache_bytes), adapters)


def pipeline_from_components(
    components: ModelComponents,
    cache: PromptEmbeddingCache | None = None,
    adapters: AdapterLibrary | None = None,
) -> Pipeline:
    """The Pipeline around loaded (and placed: precision.Placer) components, the last steps of
    `load_pipeline`; bench/gpu.py calls it on components it built in memory. With `placement.compile`, the
    transformer's blocks are compiled in place (each new input shape compiles at its first call). On a CPU
    placement the allocator is tuned for a long-running engine; on CUDA nothing of the CPU's tuning runs."""
    if components.placement.compile:
        compile_blocks(components.transformer)
    if components.placement.on_cpu:
        keep_freed_memory()
    return Pipeline(components, cache, adapters)


@dataclass(frozen=True)
class ModelOptions:
    """A model and how to load it: `load_pipeline`'s model arguments in one value, as the command line's
    model flags give them (cli_options.model_options) and as a scaled-out worker is configured
    (scale/worker.WorkerConfig)."""

    model: str
    components: str | None = None
    download: bool = False
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    offload: bool = False
    memory_budget_gib: float | None = None
    compile: bool = False

    def load(
        self,
        lora_dir: Path | None = None,
        lora_downloads: Path | None = None,
        lora_shared: ObjectStore | None = None,
    ) -> Pipeline:
        """`load_pipeline` with these options and the given LoRA arguments."""
        options = {field.name: getattr(self, field.name) for field in fields(self) if field.name != "model"}
        return load_pipeline(
            self.model, **options, lora_dir=lora_dir, lora_downloads=lora_downloads, lora_shared=lora_shared
        )


def inspect_model(model: str, *, components: str | None = None, download: bool = False) -> SpecResolver:
    """`model`'s variant and request checks from its configs and weight headers, loading no weights."""
    return SpecResolver(inspect_source(resolve_source(model, components=components, download=download)).spec)


__all__ = [
    "ModelComponents",
    "ModelOptions",
    "Pipeline",
    "SpecResolver",
    "inspect_model",
    "load_pipeline",
    "pipeline_from_components",
]
