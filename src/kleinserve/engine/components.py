"""Loaded components from a model source: the weights read block by block (engine/weights.py), each block
placed as soon as it is in (precision.Placer), int8 weights read from or written to the prepared file
(engine/prepared.py).

Why the engine reads the transformer and the text encoder itself rather than through `from_pretrained`: see
engine/weights.py (at 4B: 9.6 -> 6.0 GiB peak for the text encoder, and no stored copy outlives its packed
one). The VAE and the tokenizer, ~1 % of the bytes, go through the libraries' loaders.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3Model
from transformers.utils import logging as transformers_logging

from kleinserve.engine import checkpoints, prepared, weights
from kleinserve.engine.loading import (
    ModelSource,
    SourceInfo,
    cache_dir,
    inspect_source,
    read_config,
    weight_files,
)
from kleinserve.engine.precision import Placement, Placer, choose_load_dtype
from kleinserve.engine.spec import TEXT_ENCODER_LAYERS, ModelSpec
from kleinserve.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class ModelComponents:
    """The loaded model. `text_encoder` is Qwen3 trimmed to the last layer the transformer reads."""

    spec: ModelSpec
    tokenizer: PreTrainedTokenizerBase
    text_encoder: Qwen3Model
    transformer: Flux2Transformer2DModel
    vae: AutoencoderKLFlux2
    scheduler_config: dict[str, Any]
    placement: Placement
    prepared_weights: prepared.PreparedWeights | None = None  # int8 weights read or written


def load_components(source: ModelSource, placement: Placement) -> ModelComponents:
    """Load every component of `source` and place it as `placement` says (weights.py: read block by block,
    each block placed as soon as it is in). With int8, a prepared file found damaged midway is deleted and
    the load starts again without it (it is then written anew)."""
    placement = placement.with_budget_now()
    info = inspect_source(source)
    int8 = None
    if placement.on_cpu and placement.quantize == "int8":
        int8 = prepared.open_int8_cache(source.directory, _weight_files(source), cache_dir())
    try:
        return _load_components(source, placement, info, int8)
    except prepared.DamagedPreparedWeights as exc:
        assert int8 is not None  # only its reads raise this
        log.warning("%s; loading again without it", exc)
        int8.path.unlink(missing_ok=True)
        return _load_components(source, placement, info, prepared.Int8Cache(int8.path, int8.key))


def _load_components(
    source: ModelSource, placement: Placement, info: SourceInfo, int8: prepared.Int8Cache | None
) -> ModelComponents:
    directory = source.directory
    # Per component, so that no fp32-stored weight is ever read as bf16; the VAE is small: always fp32.
    te_dtype = choose_load_dtype(placement, info.fp32_bytes, info.stored_16bit("text_encoder"))
    dit_dtype = choose_load_dtype(placement, info.fp32_bytes, info.stored_16bit("transformer"))
    vae_dtype = choose_load_dtype(placement, info.fp32_bytes, stored_16bit=False)
    weight_bytes = (
        info.transformer_parameters * dit_dtype.itemsize
        + info.text_encoder_parameters * te_dtype.itemsize
        + info.vae_parameters * vae_dtype.itemsize
    )
    placer = Placer(placement, weight_bytes, int8)
    with _quiet_library_logs():
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{directory / 'tokenizer'}: cannot load the tokenizer ({exc})") from None
        # The transformer first: Placer packs in reading order while the budget lasts.
        transformer = _load_transformer(source, info.transformer_config, dit_dtype, placer)
        text_encoder = _load_text_encoder(directory / "text_encoder", te_dtype, placer)
        # The VAE is ~1 % of the weights: the library's loader (read, not mapped: see _load) is fine.
        vae = _load(
            directory / "vae",
            lambda p: AutoencoderKLFlux2.from_pretrained(
                p, torch_dtype=vae_dtype, output_loading_info=True, disable_mmap=True
            ),
        )
    vae.eval().requires_grad_(False)
    placer.vae(vae)
    placer.finish()
    kept = None
    if int8 is not None:
        try:
            kept = int8.save({"transformer": transformer, "text_encoder": text_encoder})
        except OSError as exc:  # a read-only or full disk costs the next start time, not this one
            log.warning("%s: cannot keep the int8 weights (%s)", int8.path, exc)
    return ModelComponents(
        spec=info.spec,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler_config=read_config(directory / "scheduler" / "scheduler_config.json"),
        placement=placement,
        prepared_weights=kept,
    )


def _weight_files(source: ModelSource) -> list[Path]:
    """The transformer's and the text encoder's weight files (what prepared weights are keyed by)."""
    transformer = (
        weight_files(source.directory / "transformer")
        if source.transformer_file is None
        else [source.transformer_file]
    )
    return transformer + weight_files(source.directory / "text_encoder")


def _load_transformer(
    source: ModelSource, config: dict[str, Any], dtype: torch.dtype, placer: Placer
) -> Flux2Transformer2DModel:
    """The transformer from the diffusers layout, or from BFL's single file (converted to diffusers names)."""
    transformer = weights.empty_model(lambda: Flux2Transformer2DModel.from_config(config))
    if source.transformer_file is None:
        where = source.directory / "transformer"
        tensors: weights.TensorSource = weights.SafetensorsFiles(weight_files(where))
    else:
        where = source.transformer_file
        # Read, not mapped: a mapped file stays resident while any tensor points into it.
        tensors = weights.StateDict(checkpoints.bfl_to_diffusers_transformer(load(where.read_bytes())))
    _fill(transformer, "transformer", tensors, dtype, where, placer)
    return transformer


def _load_text_encoder(folder: Path, dtype: torch.dtype, placer: Placer) -> Qwen3Model:
    """Qwen3 cut after the last layer the prompt embeddings read. Checkpoints saved from Qwen3ForCausalLM
    (the published one) prefix every key with `model.`; the LM head and the final norm are not read."""
    try:
        config = Qwen3Config.from_pretrained(folder, num_hidden_layers=max(TEXT_ENCODER_LAYERS))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot read the text encoder's config ({exc})") from None
    text_encoder = weights.empty_model(lambda: Qwen3Model(config))
    # The last hidden state a Qwen3Model returns has gone through the final RMSNorm. With the model cut
    # at layer 27 that would corrupt h27, so the norm becomes the identity (model.md section 4).
    text_encoder.norm = torch.nn.Identity()
    tensors = weights.SafetensorsFiles(weight_files(folder), rename=lambda key: key.removeprefix("model."))
    _fill(text_encoder, "text_encoder", tensors, dtype, folder, placer)
    return text_encoder


def _fill(
    model: torch.nn.Module,
    component: str,
    tensors: weights.TensorSource,
    dtype: torch.dtype,
    where: Path,
    placer: Placer,
) -> None:
    """weights.fill with `placer` placing each block, the names it sees prefixed with `component`."""
    weights.fill(
        model,
        tensors,
        dtype,
        where,
        after_block=lambda block, name: placer.block(block, f"{component}.{name}"),
        after_rest=placer.rest,
        skip=lambda name: placer.provided(f"{component}.{name}"),
    )


def _load(folder: Path, loader: Any) -> Any:
    """Run a library `from_pretrained(..., output_loading_info=True, disable_mmap=True)`; any missing or
    mismatched weight is an error (the libraries would leave it randomly initialised or on the meta device).
    disable_mmap: a memory-mapped checkpoint stays mapped, and counted in RSS, while any tensor still points
    into it."""
    try:
        model, report = loader(folder)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{folder}: cannot load weights ({exc})") from None
    missing = list(report.get("missing_keys", [])) + [str(k) for k in report.get("mismatched_keys", [])]
    if missing:
        raise weights.missing_weights(folder, missing)
    return model


class _quiet_library_logs:
    """The libraries' loaders (tokenizer, VAE) log and show progress bars meant for notebooks. diffusers'
    disable_mmap reads with `open(path).read()` and never closes the file (the ResourceWarning is theirs;
    CPython closes it at once)."""

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", ResourceWarning)
        self._levels = (transformers_logging.get_verbosity(), diffusers_logging.get_verbosity())
        transformers_logging.set_verbosity_error()
        diffusers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        transformers_logging.set_verbosity(self._levels[0])
        diffusers_logging.set_verbosity(self._levels[1])
        transformers_logging.enable_progress_bar()
        self._warnings.__exit__(*exc)
