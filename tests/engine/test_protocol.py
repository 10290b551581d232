"""The Engine protocol: what api/ and jobs/ may use of a loaded pipeline."""

from __future__ import annotations

from kleinserve.engine import Pipeline
from kleinserve.engine.protocol import Engine, EngineStats
from kleinserve.types import GenerateRequest
from tests.conftest import pixels


def test_pipeline_is_an_engine(pipeline: Pipeline) -> None:
    engine: Engine = pipeline  # mypy checks the members' signatures where src/ passes a Pipeline as an Engine
    request = GenerateRequest(prompt="an engine probe", width=64, height=64, steps=1, seed=4)
    resolved = engine.resolve(request)
    [batched] = engine.generate_batch([resolved])
    alone = engine.generate(request)
    assert batched.images[0].seed == alone.images[0].seed == 4
    assert (pixels(batched.images[0].image) == pixels(alone.images[0].image)).all()
    assert engine.spec.name == "tiny-random"


def test_stats_count_prompt_cache_lookups(pipeline: Pipeline) -> None:
    engine: Engine = pipeline
    request = GenerateRequest(prompt="a prompt only this test encodes", width=64, height=64, steps=1, seed=0)
    before = engine.stats()
    engine.generate(request)
    first = engine.stats()
    engine.generate(request)
    second = engine.stats()
    assert first.prompt_cache_misses == before.prompt_cache_misses + 1
    assert second.prompt_cache_hits == first.prompt_cache_hits + 1
    assert second.prompt_cache_misses == first.prompt_cache_misses


def test_hit_ratio_is_zero_before_any_lookup() -> None:
    assert EngineStats(prompt_cache_hits=0, prompt_cache_misses=0).prompt_cache_hit_ratio == 0.0
    assert EngineStats(prompt_cache_hits=3, prompt_cache_misses=1).prompt_cache_hit_ratio == 0.75
