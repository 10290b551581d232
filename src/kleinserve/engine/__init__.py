"""The engine: model loading and generation. Knows nothing of HTTP, queues or wire formats.

from kleinserve.engine import load_pipeline
pipeline = load_pipeline("tiny-random")

The rest of kleinserve sees a loaded pipeline only as an `Engine` (engine/protocol.py).
"""

from __future__ import annotations

from kleinserve.engine.loading import ModelComponents, inspect_source, load_components, resolve_source
from kleinserve.engine.pipeline import Pipeline
from kleinserve.engine.precision import check_runnable, choose_placement, keep_freed_memory
from kleinserve.engine.resolve import SpecResolver
from kleinserve.engine.text import DEFAULT_CACHE_BYTES, PromptEmbeddingCache


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
    prompt_cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Pipeline:
    """Resolve `model` (directory, BFL file, HF repo id or `tiny-random`), load it, wrap it in a Pipeline.
    Also tunes the process's allocator for the engine (precision.keep_freed_memory)."""
    keep_freed_memory()
    source = resolve_source(model, components=components, download=download)
    placement = choose_placement(device, dtype, quantize, offload, memory_budget_gib)
    check_runnable(placement)  # before reading any weight
    return Pipeline(load_components(source, placement), PromptEmbeddingCache(prompt_cache_bytes))


def inspect_model(model: str, *, components: str | None = None, download: bool = False) -> SpecResolver:
    """`model`'s variant and request checks from its configs and weight headers, loading no weights."""
    return SpecResolver(inspect_source(resolve_source(model, components=components, download=download)).spec)


__all__ = ["ModelComponents", "Pipeline", "SpecResolver", "inspect_model", "load_pipeline"]
