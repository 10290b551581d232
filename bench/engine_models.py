"""The engine benchmark's models on disk (bench/engine.py builds them in a subprocess of its own): the tiny
random model and the real FLUX.2 [klein] 4B architecture with deterministic random weights;
bench/gpu_models.py builds the same 4B modules on a GPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The klein-4B transformer (model.md section 2) and Qwen3-4B (model.md section 4).
KLEIN_4B_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
QWEN3_4B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)
RANDOM_4B_VERSION = "1"  # bump when build_random_klein_4b changes what it writes


def build_tiny(directory: Path) -> None:
    from kleinserve.engine.tiny import create_tiny

    shutil.rmtree(directory, ignore_errors=True)
    create_tiny(directory)


def build_random_klein_4b(directory: Path, threads: int, seed: int = 0) -> None:
    """Build klein-4B on the meta device, materialise it in bf16, fill it deterministically and save it.

    Peak memory is the bf16 weights (~16 GB) plus one 2 GB shard being written.
    """
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kleinserve.engine.tiny import SCHEDULER_CONFIG, make_byte_tokenizer

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**KLEIN_4B_TRANSFORMER)
        vae = AutoencoderKLFlux2()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
        module.to(torch.bfloat16).to_empty(device="cpu")
    text_encoder.tie_weights()  # to_empty gives every module its own tensor; restore the tied embeddings
    if text_encoder.lm_head.weight is not text_encoder.model.embed_tokens.weight:
        raise RuntimeError("lm_head and embed_tokens are not tied after tie_weights()")
    for module in (transformer, vae, text_encoder):
        fill_deterministically(module, generator)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_byte_tokenizer(),
        transformer=transformer,
        is_distilled=True,
    )
    pipeline.save_pretrained(directory, safe_serialization=True, max_shard_size="2GB")


def fill_deterministically(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Matrices and conv kernels ~ N(0, 1/fan_in) (activations stay finite), norm scales 1, biases 0,
    BatchNorm running statistics mean 0 / variance 1."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():  # tied parameters are listed once
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                raise ValueError(f"no fill rule for parameter {name} {tuple(param.shape)}")
        persistent = module.state_dict().keys()
        for name, buffer in module.named_buffers():
            if name not in persistent:
                continue  # recomputed at load time (e.g. rotary inv_freq)
            if name.endswith(("running_mean", "num_batches_tracked")):
                buffer.zero_()
            elif name.endswith("running_var"):
                buffer.fill_(1.0)
            else:
                raise ValueError(f"no fill rule for buffer {name} {tuple(buffer.shape)}")
