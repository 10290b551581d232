"""`tiny-random`: a deterministic, randomly initialised FLUX.2 [klein] with the real classes, written to disk
in the layouts users download, so that tests and demos go through the real loader.

The directory has the diffusers layout of `black-forest-labs/FLUX.2-klein-4B` (`model_index.json`,
`scheduler/`, `text_encoder/`, `tokenizer/`, `transformer/`, `vae/`) plus, like that repo, BFL's single-file
transformer checkpoint at the root (`flux-2-klein-tiny.safetensors`, BFL key names).

Shape rules that keep the tiny model faithful to the real one (model.md section 11): transformer
`in_channels = 4 * latent_channels`; `joint_attention_dim = 3 * text hidden size`;
`sum(axes_dims_rope) = attention_head_dim`; four VAE levels (spatial factor 8); a text encoder with >= 28
layers so that layer 27 is a raw layer output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from kleinserve.engine.checkpoints import diffusers_to_bfl_transformer

TINY_NAME = "tiny-random"
TINY_BASE_NAME = "tiny-random-base"
BFL_TINY_FILE = "flux-2-klein-tiny.safetensors"

# Qwen3's chat template reduced to what the pipeline renders: one user turn, the generation prompt, and the
# empty think block that `enable_thinking=False` adds.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

# FLUX.2's scheduler configuration. Without use_dynamic_shifting the pipeline's mu is silently ignored.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level BPE tokenizer with Qwen3's special tokens: one token per byte, id 0 pads."""
    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="right",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def small_qwen3(vocab_size: int, hidden_size: int, head_dim: int) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 with the 28 layers the pipeline needs (it reads layer 27's output)."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


def small_vae(
    channels: tuple[int, int, int, int], latent_channels: int, groups: int, sample_size: int
) -> AutoencoderKLFlux2:
    """A randomly initialised klein VAE: four levels (spatial factor 8), one layer per block."""
    return AutoencoderKLFlux2(
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=sample_size,
    )


def small_transformer(
    latent_channels: int, text_dim: int, *, layers: int, single_layers: int, heads: int, head_dim: int
) -> Flux2Transformer2DModel:
    """A randomly initialised klein transformer of any size; the widths that must agree with the VAE and the
    text encoder are derived here (module docstring), the rest is klein's (model.md section 2)."""
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=layers,
        num_single_layers=single_layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        joint_attention_dim=3 * text_dim,
        axes_dims_rope=(head_dim // 4,) * 4,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        rope_theta=2000,
        guidance_embeds=False,
    )


def assemble(
    tokenizer: PreTrainedTokenizerFast,
    text_encoder: Qwen3ForCausalLM,
    vae: AutoencoderKLFlux2,
    transformer: Flux2Transformer2DModel,
    distilled: bool,
) -> Flux2KleinPipeline:
    """The diffusers pipeline around the parts, with FLUX.2's scheduler configuration."""
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )


def save_named(pipeline: Flux2KleinPipeline, directory: Path, **index_entries: object) -> Path:
    """Write `pipeline` in the diffusers layout (safetensors) and add kleinserve's `_kleinserve_*` entries
    (`name=...` becomes `_kleinserve_name`) to its model_index.json; diffusers ignores them."""
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(directory, safe_serialization=True)
    index_path = directory / "model_index.json"
    model_index = json.loads(index_path.read_text())
    model_index.update({f"_kleinserve_{key}": value for key, value in index_entries.items()})
    index_path.write_text(json.dumps(model_index, indent=2) + "\n")
    return directory


def build_tiny_pipeline(seed: int = 0, distilled: bool = True, text_dim: int = 16) -> Flux2KleinPipeline:
    """The tiny pipeline in memory; the same seed always gives the same weights."""
    tokenizer = make_byte_tokenizer()
    latent_channels = 4
    torch.manual_seed(seed)
    text_encoder = small_qwen3(len(tokenizer), text_dim, head_dim=8)
    vae = small_vae((8, 8, 16, 16), latent_channels, groups=4, sample_size=64).eval()
    # Random BatchNorm statistics, so that a missing latent (de)normalisation changes the pixels.
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = small_transformer(
        latent_channels, text_dim, layers=1, single_layers=2, heads=2, head_dim=16
    )
    return assemble(tokenizer, text_encoder, vae, transformer.eval(), distilled)


def create_tiny(directory: Path, seed: int = 0, distilled: bool = True) -> Path:
    """Write the tiny model to `directory` (diffusers layout + BFL single file); returns the directory."""
    pipeline = build_tiny_pipeline(seed=seed, distilled=distilled)
    save_named(pipeline, directory, name=TINY_NAME if distilled else TINY_BASE_NAME)
    state = {k: v.contiguous() for k, v in pipeline.transformer.state_dict().items()}
    save_file(diffusers_to_bfl_transformer(state), str(directory / BFL_TINY_FILE))
    return directory
