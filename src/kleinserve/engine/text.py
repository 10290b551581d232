"""Prompt -> Qwen3 hidden states -> prompt embeddings (B, L, 3 * hidden), with a bounded LRU cache.

Easy to get wrong (each guarded by tests/engine/test_text.py and the fidelity tests):
- the prompt is wrapped in Qwen3's chat template with `enable_thinking=False`, no system prompt;
- every prompt is padded to exactly `max_sequence_length` (512) tokens; all positions, padding included,
  enter the transformer, which gets no text mask;
- embeddings are the raw outputs of decoder layers 9, 18 and 27 concatenated per token [h9 | h18 | h27];
  the encoder stops after layer 27 and has no final norm and no LM head (see loading.py);
- attention leaves out the trailing padding keys no query may see (`unpadded_sdpa`): exact, not an
  approximation, because Qwen3 is causal and its padding mask masks keys.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedTokenizerBase, Qwen3Model
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kleinserve.engine.spec import TEXT_ENCODER_LAYERS

DEFAULT_CACHE_BYTES = 512 << 20
UNPADDED_SDPA = "kleinserve_unpadded_sdpa"


def unpadded_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention over only the keys some query may attend to.

    query (B, heads, Q, head_dim), key/value (B, kv_heads, K, head_dim), attention_mask (B, 1, Q, K) bool,
    True = may attend. A prompt is ~20 tokens padded to 512 on the right, so most keys are padding that no
    query sees; a masked key adds exactly zero after the softmax, and dropping the trailing ones skips that
    work (the speed-up is in README, Performance). In a causal mask the last query row sees every key any
    row sees, so it alone decides the cut. Embeddings equal diffusers' (tests/engine/test_text.py).
    """
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        seen = attention_mask[:, :, -1, :].flatten(0, 1).any(dim=0).nonzero()  # (n, 1) key indices
        keep = int(seen.max()) + 1 if len(seen) else attention_mask.shape[-1]
        key, value, attention_mask = key[:, :, :keep], value[:, :, :keep], attention_mask[..., :keep]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(UNPADDED_SDPA, unpadded_sdpa)
AttentionMaskInterface.register(UNPADDED_SDPA, sdpa_mask)  # the same boolean masks as "sdpa"


class PromptEmbeddingCache:
    """LRU cache of prompt embeddings bounded by the bytes of the stored tensors."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int]) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: tuple[str, int], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= _size(self._entries.pop(key))
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= _size(evicted)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class PromptEncoder:
    """Turns prompts into the (L, 3 * hidden) embeddings the transformer reads, caching by (prompt, L)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: Qwen3Model,
        dtype: torch.dtype,
        cache: PromptEmbeddingCache | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        text_encoder.set_attn_implementation(UNPADDED_SDPA)
        self.dtype = dtype
        self.cache = cache if cache is not None else PromptEmbeddingCache()

    def encode(self, prompts: list[str], max_sequence_length: int, device: torch.device) -> torch.Tensor:
        """(len(prompts), max_sequence_length, 3 * hidden) in the compute dtype, on `device`."""
        cached = {p: self.cache.get((p, max_sequence_length)) for p in dict.fromkeys(prompts)}
        found = {p: embedding for p, embedding in cached.items() if embedding is not None}
        missing = [p for p in cached if p not in found]
        if missing:
            encoded = self._run(missing, max_sequence_length)
            for prompt, embedding in zip(missing, encoded, strict=True):
                found[prompt] = embedding
                self.cache.put((prompt, max_sequence_length), embedding)
        return torch.stack([found[p] for p in prompts]).to(device)  # KeyError, never a shorter stack

    @torch.inference_mode()
    def _run(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        return self.embed(prompts, max_sequence_length)

    def count_tokens(self, prompts: list[str], max_sequence_length: int) -> list[int]:
        """Tokens the text encoder reads for each prompt, padding left out: the chat template's and the
        prompt's, truncated at `max_sequence_length` as `embed` truncates them (what OpenAI-style usage
        reports as text tokens). Tokenizing only, no model call."""
        tokens = self.tokenizer(self._templated(prompts), truncation=True, max_length=max_sequence_length)
        return [sum(mask) for mask in tokens["attention_mask"]]

    def _templated(self, prompts: list[str]) -> list[str]:
        """Each prompt wrapped in Qwen3's chat template as one user turn, thinking off."""
        return [
            str(  # a str with tokenize=False
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    tokenize=False,
                    add_generation_prompt=True,
                    enable_thinking=False,
                )
            )
            for prompt in prompts
        ]

    def embed(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """(len(prompts), max_sequence_length, 3 * hidden) on the CPU, uncached and differentiable (the toy
        model's training teaches the text encoder through it); serving goes through `encode`."""
        tokens = self.tokenizer(
            self._templated(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=max_sequence_length,
        )
        device = next(self.text_encoder.parameters()).device
        output = self.text_encoder(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        # hidden_states[k] is the output of decoder layer k (index 0 = embeddings).
        layers = [output.hidden_states[k] for k in TEXT_ENCODER_LAYERS]  # 3 x (B, L, hidden)
        return torch.cat(layers, dim=-1).to(dtype=self.dtype, device="cpu")  # (B, L, 3 * hidden)
