"""The engine as the rest of kleinserve sees it: one narrow interface (as vLLM's `EngineClient`).

    engine: Engine = load_pipeline("tiny-random")
    resolved = engine.resolve(GenerateRequest(prompt="a fox", seed=1))   # InvalidInput before queueing
    [result] = engine.generate_batch([resolved], on_step=print)
    engine.restore(resolved.stored)                                     # the same resolution, unchecked
    engine.stats().prompt_cache_hits
    engine.adapters.names() if engine.adapters else []                  # LoRA adapters: [AdapterInfo, ...]

`api/` and `jobs/` import the engine only from here: `Engine`, the types it names (`ModelSpec`,
`ResolvedRequest`, `EngineStats`, `AdapterLibrary`, `AdapterInfo`), `SIZE_MULTIPLE` (output sides are
floored to a multiple of it) and the LoRA limits `MAX_LORAS`, `MAX_LORA_SCALE`.
`engine.Pipeline` implements it (tests/engine/test_protocol.py); a test double or a remote engine would
implement it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kleinserve.engine.lora import LORA_DOWNLOADS, MAX_LORA_SCALE, MAX_LORAS, AdapterInfo, AdapterLibrary
from kleinserve.engine.resolve import ResolvedRequest
from kleinserve.engine.spec import SIZE_MULTIPLE, ModelSpec
from kleinserve.types import CancelCheck, GenerateRequest, GenerateResult, StepCallback


@dataclass(frozen=True)
class EngineStats:
    """Counters of a running engine since it started, read for /metrics: prompt embedding cache lookups."""

    prompt_cache_hits: int
    prompt_cache_misses: int

    @property
    def prompt_cache_hit_ratio(self) -> float:
        """Hits / lookups; 0.0 before the first lookup."""
        return self.prompt_cache_hits / max(1, self.prompt_cache_hits + self.prompt_cache_misses)


class Engine(Protocol):
    """A loaded model that turns resolved requests into images. Not thread-safe: `generate_batch` and
    `generate` are called from one thread (the engine's); `spec`, `resolve` and `stats` from any."""

    @property
    def spec(self) -> ModelSpec:
        """The loaded variant: its name, defaults and sampling policy."""
        ...

    @property
    def adapters(self) -> AdapterLibrary | None:
        """The LoRA adapters requests may name (`names`, `describe`, `add` for a downloaded file), checked
        against this model; None when the server applies none."""
        ...

    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        """Apply the variant's defaults and policy and check every value; raises InvalidInput naming the
        parameter. Needs no weights: cheap enough to run at submit."""
        ...

    def restore(self, stored: GenerateRequest) -> ResolvedRequest:
        """The resolution `resolve` gave before, from its `ResolvedRequest.stored` form (a queued job's
        request read back): nothing is checked or prepared again, so it is cheap and, after a restart,
        identical."""
        ...

    def generate(
        self,
        request: GenerateRequest,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> GenerateResult:
        """Resolve and run one request alone (warm-up, CLI, tests)."""
        ...

    def generate_batch(
        self,
        resolved: Sequence[ResolvedRequest],
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> list[GenerateResult]:
        """Run requests of one `batch_key` as one batch; results in request order. `on_step` gets each
        denoising step of the whole batch (its preview holds every image, in order); `cancelled` is asked
        between steps and True stops the batch with Cancelled. InvalidInput if the keys differ."""
        ...

    def stats(self) -> EngineStats:
        """The engine's counters now."""
        ...


__all__ = [
    "LORA_DOWNLOADS",
    "MAX_LORAS",
    "MAX_LORA_SCALE",
    "SIZE_MULTIPLE",
    "AdapterInfo",
    "AdapterLibrary",
    "Engine",
    "EngineStats",
    "ModelSpec",
    "ResolvedRequest",
]
