"""bench/gpu.py's models: klein at its real 4B shapes (or tiny-random's) with deterministic random weights
made directly on the device, and the two pipelines around them, diffusers' and kleinserve's.

Both pipelines get modules built from the same seed on the same device, so they hold the same bf16 values;
fp32 modules are the bf16 ones widened (exact). kleinserve's are placed by its own `precision.Placer`, as its
loader places what it reads, then wrapped by `pipeline_from_components` (compilation included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine_models import KLEIN_4B_TRANSFORMER, QWEN3_4B, fill_deterministically  # bench/engine_models.py

if TYPE_CHECKING:
    import torch

# Shapes: klein-4B (bench/engine.py, model.md sections 2 and 4) and tiny-random's (engine/tiny.py).
TINY_TEXT_DIM = 16
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "4b": {"transformer": KLEIN_4B_TRANSFORMER, "qwen3": QWEN3_4B, "vae": {}},
    "tiny": {
        "transformer": dict(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            joint_attention_dim=3 * TINY_TEXT_DIM,
            axes_dims_rope=(4, 4, 4, 4),
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            rope_theta=2000,
            guidance_embeds=False,
        ),
        "qwen3": dict(
            vocab_size=261,  # tiny.make_byte_tokenizer: 256 bytes and 5 special tokens
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=2 * TINY_TEXT_DIM,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        ),
        "vae": dict(
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4
        ),
    },
}


@dataclass
class Modules:
    """One model's parts on the device as diffusers' pipeline holds them (the full Qwen3, its LM head too)."""

    tokenizer: Any
    text_encoder: Any  # Qwen3ForCausalLM
    transformer: Any  # Flux2Transformer2DModel
    vae: Any  # AutoencoderKLFlux2


def build_modules(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Modules:
    """The model built on the meta device, its parameters made on `device` and filled in bf16 from a
    generator on `device` (bench/engine_models.py's fill_deterministically), then converted to `dtype` (fp32
    holds every bf16 value exactly). Buffers computed at construction (Qwen3's rotary frequencies) stay as
    built."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kleinserve.engine.tiny import make_byte_tokenizer
    from kleinserve.engine.weights import empty_model

    shapes = SHAPES[size]
    transformer = empty_model(lambda: Flux2Transformer2DModel(**shapes["transformer"]))
    vae = empty_model(lambda: AutoencoderKLFlux2(**shapes["vae"]))
    text_encoder = empty_model(lambda: Qwen3ForCausalLM(Qwen3Config(**shapes["qwen3"])))
    generator = torch.Generator(device).manual_seed(seed)
    for module in (transformer, vae, text_encoder):
        materialize(module, device, torch.bfloat16)
        fill_deterministically(module, generator)
        if dtype != torch.bfloat16 or module is not text_encoder:
            module.to(dtype)  # diffusers' torch_dtype converts float buffers too (the VAE's BatchNorm)
    return Modules(make_byte_tokenizer(), text_encoder, transformer, vae)


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Every meta parameter of `module` made (uninitialised) on `device` in `dtype`, tied ones tied still;
    buffers moved to `device` as they are."""
    import torch

    made: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False
                )
            setattr(sub, name, made[id(param)])
        for name, buffer in list(sub.named_buffers(recurse=False)):
            sub.register_buffer(
                name, buffer.to(device), persistent=name not in sub._non_persistent_buffers_set
            )


def stock_pipeline(modules: Modules) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from kleinserve.engine.tiny import SCHEDULER_CONFIG

    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=modules.vae,
        text_encoder=modules.text_encoder,
        tokenizer=modules.tokenizer,
        transformer=modules.transformer,
        is_distilled=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kleinserve_pipeline(modules: Modules, device: torch.device, dtype: str, options: dict[str, Any]) -> Any:
    """kleinserve's Pipeline around `modules`, placed as its loader places what it reads (precision.Placer):
    the text encoder trimmed to the 27 layers the embeddings read, its final norm the identity (as
    engine/components.py loads it)."""
    import torch

    from kleinserve.engine import ModelComponents, pipeline_from_components
    from kleinserve.engine.precision import Placer, check_runnable, choose_placement
    from kleinserve.engine.spec import TEXT_ENCODER_LAYERS, detect_spec
    from kleinserve.engine.tiny import SCHEDULER_CONFIG

    placement = choose_placement(
        str(device), dtype, options.get("quantize"), compile=bool(options.get("compile"))
    )
    check_runnable(placement)
    text_encoder = modules.text_encoder.model
    kept = max(TEXT_ENCODER_LAYERS)
    text_encoder.layers = text_encoder.layers[:kept]
    text_encoder.config.num_hidden_layers = kept
    text_encoder.norm = torch.nn.Identity()
    transformer, vae = modules.transformer, modules.vae
    weight_bytes = sum(
        p.numel() * p.element_size() for m in (transformer, text_encoder, vae) for p in m.parameters()
    )
    placer = Placer(placement, weight_bytes)
    placer.module(transformer, "transformer")
    placer.module(text_encoder, "text_encoder")
    placer.vae(vae)
    placer.finish()
    parameters = sum(p.numel() for p in transformer.parameters())
    components = ModelComponents(
        spec=detect_spec({"is_distilled": True}, dict(transformer.config), parameters),
        tokenizer=modules.tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler_config=dict(SCHEDULER_CONFIG),
        placement=placement,
    )
    return pipeline_from_components(components)
