"""What kind of FLUX.2 [klein] a checkpoint is, read from its configs, never guessed from file names.

`detect_spec` looks at `model_index.json` (`is_distilled`), the transformer config (width) and the text
encoder config (width). The variant decides the sampling defaults and policy (`ModelSpec`):

| variant               | steps    | guidance  | CFG                      | text encoder |
|-----------------------|----------|-----------|--------------------------|--------------|
| flux-2-klein-4b       | 4 fixed* | 1.0 fixed | no (one pass per step)   | Qwen3-4B     |
| flux-2-klein-base-4b  | 50       | 4.0       | real CFG, negative ""    | Qwen3-4B     |
| flux-2-klein-9b       | 4 fixed* | 1.0 fixed | no                       | Qwen3-8B     |
| flux-2-klein-base-9b  | 50       | 4.0       | real CFG                 | Qwen3-8B     |

*for requests marked `fixed_by_variant` (as the hosted APIs fix it); others may ask for another count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Transformer width (heads x head_dim) -> size name of the published checkpoints.
_SIZE_BY_WIDTH = {3072: "4b", 4096: "9b"}

# Qwen3 hidden states concatenated per token: [h9 | h18 | h27] (BFL OUTPUT_LAYERS_QWEN3, diffusers
# text_encoder_out_layers). Guarded by tests/engine/test_text.py::test_trimmed_encoder_matches_full_model.
TEXT_ENCODER_LAYERS = (9, 18, 27)

# The engine's own size bounds (pixels, inclusive); dialects may be stricter.
MIN_SIDE = 64
MAX_SIDE = 2048
SIZE_MULTIPLE = 16
DEFAULT_SIDE = 1024
MAX_IMAGES_PER_REQUEST = 4
MAX_REFERENCE_IMAGES = 4
MAX_SEQUENCE_LENGTH = 512
MAX_STEPS = 200
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class ModelSpec:
    """One variant: its public name, what it was trained for, and its sampling policy, stated here once.

    The policy follows from `distilled` (model_index.json's `is_distilled`), the one fact that decides it,
    read through the properties below; `resolve_request` (engine/resolve.py) applies it:
    - `guidance_fixed`: guidance is distilled into the weights; a guidance value sent is ignored.
    - `steps_fixed`: the step count was distilled too; a request with `fixed_by_variant` (the dialects
      whose hosted API fixes it) gets `default_steps` whatever it asks, any other may ask for another count.
    - `uses_cfg`: each step runs the transformer twice (conditional and unconditional) and mixes the two
      with `guidance`.
    Values a request may ask for lie in `steps_range` and `guidance_range` (inclusive).
    """

    name: str
    distilled: bool
    default_steps: int
    default_guidance: float
    parameters: int  # transformer parameters
    default_side: int = DEFAULT_SIDE  # pixels per side when a request gives no size and no reference
    max_sequence_length: int = MAX_SEQUENCE_LENGTH  # prompt tokens the transformer was trained to read
    steps_range: tuple[int, int] = (1, MAX_STEPS)
    guidance_range: tuple[float, float] = (0.0, MAX_GUIDANCE)

    @property
    def guidance_fixed(self) -> bool:
        return self.distilled

    @property
    def steps_fixed(self) -> bool:
        return self.distilled

    @property
    def uses_cfg(self) -> bool:
        return not self.distilled


def detect_spec(
    model_index: dict[str, Any],
    transformer_config: dict[str, Any],
    transformer_parameters: int,
    name: str | None = None,
) -> ModelSpec:
    """The spec of a checkpoint. `name` overrides the derived name; a model_index.json may name itself with
    `_kleinserve_name` and set the size and text length it was trained for with `_kleinserve_default_side` and
    `_kleinserve_max_sequence_length` (the toy model does; diffusers ignores keys starting with "_")."""
    # diffusers: a model_index without `is_distilled` means False (the base checkpoints omit it).
    distilled = bool(model_index.get("is_distilled", False))
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    size = _SIZE_BY_WIDTH.get(width, f"custom-{width}")
    derived = f"flux-2-klein-{size}" if distilled else f"flux-2-klein-base-{size}"
    return ModelSpec(
        name=name or model_index.get("_kleinserve_name") or derived,
        distilled=distilled,
        default_steps=4 if distilled else 50,
        default_guidance=1.0 if distilled else 4.0,
        parameters=transformer_parameters,
        default_side=int(model_index.get("_kleinserve_default_side", DEFAULT_SIDE)),
        max_sequence_length=int(model_index.get("_kleinserve_max_sequence_length", MAX_SEQUENCE_LENGTH)),
    )
