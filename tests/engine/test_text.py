"""Prompt embeddings: the trimmed Qwen3 gives exactly what the full model gives; the cache is bounded."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kleinserve.engine import text
from kleinserve.engine.text import PromptEmbeddingCache


def test_trimmed_encoder_matches_full_model(pipeline, tiny_dir):
    # The encoder stops after layer 27 with its final norm removed; h27 must be the raw layer output.
    assert len(pipeline.components.text_encoder.layers) == 27
    full = Qwen3ForCausalLM.from_pretrained(tiny_dir / "text_encoder").eval()
    ours = pipeline.prompts._run(["a cat", "a much longer prompt about a dog"], 512)
    reference = pipeline_reference_embeddings(
        full, pipeline.components.tokenizer, ["a cat", "a much longer prompt about a dog"]
    )
    assert ours.shape == (2, 512, 48)
    # Not bit-equal: our Linear layers run through oneDNN with packed weights, diffusers' through MKL. A
    # normed h27 would differ by orders of magnitude more than this tolerance.
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("lengths", "left", "keys_used"), [((3, 5), False, 5), ((3, 5), True, 16)])
def test_unpadded_attention_drops_only_keys_no_query_sees(monkeypatch, lengths, left, keys_used):
    # Padding on the right: keys past the longest prompt are dropped. On the left nothing may be dropped.
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 2, 16, 8, generator=generator) for _ in range(3))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    real = torch.zeros(2, 16, dtype=torch.bool)  # (B, K): which keys are prompt tokens, not padding
    for row, length in enumerate(lengths):
        tokens = slice(16 - length, 16) if left else slice(0, length)
        real[row, tokens] = True
    mask = (causal & real[:, None, :])[:, None]  # (B, 1, Q, K)
    module = torch.nn.Module()
    module.is_causal = True
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append(key.shape[2])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(text, "sdpa_attention_forward", recording)
    ours, _ = text.unpadded_sdpa(module, query, key, value, mask)
    assert seen == [keys_used]
    torch.testing.assert_close(ours, expected, equal_nan=True)


def pipeline_reference_embeddings(text_encoder, tokenizer, prompts):
    from diffusers import Flux2KleinPipeline

    with torch.no_grad():
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder, tokenizer, prompts, dtype=torch.float32
        )


def test_embeddings_are_cached_by_prompt_and_length(pipeline):
    cache = pipeline.prompts.cache
    hits = cache.hits
    first = pipeline.prompts.encode(["cached prompt"], 512, torch.device("cpu"))
    second = pipeline.prompts.encode(["cached prompt"], 512, torch.device("cpu"))
    assert cache.hits == hits + 1
    assert torch.equal(first, second)
    short = pipeline.prompts.encode(["cached prompt"], 64, torch.device("cpu"))
    assert short.shape[1] == 64


def test_cache_is_bounded_by_bytes_and_evicts_least_recent():
    cache = PromptEmbeddingCache(max_bytes=3 * 400)
    tensors = {name: torch.zeros(100) for name in "abcd"}  # 400 bytes each
    for name in "abc":
        cache.put((name, 1), tensors[name])
    assert cache.get(("a", 1)) is not None  # a becomes most recent
    cache.put(("d", 1), tensors["d"])
    assert cache.get(("b", 1)) is None  # least recently used went first
    assert cache.get(("a", 1)) is not None and len(cache) == 3 and cache.bytes == 1200
    cache.put(("huge", 1), torch.zeros(1000))  # larger than the whole cache: not stored
    assert cache.get(("huge", 1)) is None
