"""The toy model's architecture: the real FLUX.2 [klein] classes at a size that trains on 2 CPU cores.

Shape rules are tiny-random's (engine/tiny.py): transformer `in_channels = 4 * latent_channels`,
`joint_attention_dim = 3 * text hidden size`, `sum(axes_dims_rope) = attention_head_dim`, four VAE levels,
a 28-layer Qwen3 so that layer 27 is a raw layer output.

Two choices specific to the toy:
- a word-level tokenizer over the scenes' vocabulary (scenes.vocabulary): one token per word, so that the
  frozen text encoder hands the transformer whole words rather than bytes to assemble;
- the text encoder stays random and frozen, with token embeddings scaled up (EMBEDDING_STD) so that each
  token's identity dominates its residual stream through all 27 layers instead of drowning in the mixing of
  27 random layers (initialised at std 0.02, the embedding would be as small as each layer's update).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    Flux2KleinPipeline,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kleinserve.engine.loading import TOY_NAME
from kleinserve.engine.tiny import (
    CHAT_TEMPLATE,
    assemble,
    save_named,
    small_qwen3,
    small_transformer,
    small_vae,
)
from kleinserve.toy.scenes import vocabulary

TEXT_DIM = 32
LATENT_CHANNELS = 8
EMBEDDING_STD = 0.5
TOY_SIDE = 256  # trained at 128 and 256 px; the default size of a request that gives none
# Prompt tokens (klein reads 512). The longest caption with the chat template is 28 tokens. With 512, the
# transformer had to find ~20 informative tokens among ~490 near-identical pads, and after 1,000 steps it
# still ignored the prompt; 32 also makes a training step ~4x cheaper than 512.
TEXT_LENGTH = 32
PAD, UNKNOWN = "<|endoftext|>", "<|unk|>"


def make_word_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased words and punctuation marks, one token each; unknown words share one token; id 0 pads."""
    words = [PAD, UNKNOWN, *vocabulary(), "user", "assistant"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNKNOWN))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=PAD, pad_token=PAD, unk_token=UNKNOWN, padding_side="right"
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_toy_pipeline(seed: int) -> Flux2KleinPipeline:
    """The untrained toy model (random weights from `seed`), as a diffusers pipeline."""
    tokenizer = make_word_tokenizer()
    torch.manual_seed(seed)
    text_encoder = small_qwen3(len(tokenizer), TEXT_DIM, head_dim=16)
    with torch.no_grad():
        embeddings = text_encoder.model.embed_tokens.weight  # get_input_embeddings(), typed
        embeddings.mul_(EMBEDDING_STD / embeddings.std())
    vae = small_vae((16, 32, 64, 64), LATENT_CHANNELS, groups=8, sample_size=128)
    transformer = small_transformer(
        LATENT_CHANNELS, TEXT_DIM, layers=2, single_layers=4, heads=4, head_dim=32
    )
    return assemble(tokenizer, text_encoder, vae, transformer, distilled=True)


def save_toy(pipeline: Flux2KleinPipeline, directory: Path, training: dict[str, object]) -> Path:
    """Write the diffusers layout (safetensors) under `directory`, named `flux-2-klein-toy`, with the
    training configuration that made it (`_kleinserve_training`, so a test can tell when the committed
    weights and `kleinserve toy train`'s defaults drift apart)."""
    return save_named(
        pipeline,
        directory,
        name=TOY_NAME,
        default_side=TOY_SIDE,
        max_sequence_length=TEXT_LENGTH,
        training=training,
    )
