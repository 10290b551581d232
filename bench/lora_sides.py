"""The two sides of bench/lora.py, per size: kleinserve (one batch of requests with different adapters, and
single requests) and diffusers (one request at a time, switching adapters), over the same weights and the same
adapter files; see bench/lora.py's docstring for what each configuration runs and counts."""

from __future__ import annotations

import abc
import copy
import functools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin
from engine_child import PROMPTS, STEPS  # bench/engine_child.py
from engine_models import KLEIN_4B_TRANSFORMER, fill_deterministically  # bench/engine_models.py
from torch import nn

from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.engine import latents as L
from kleinserve.engine.lora import AdapterLibrary, ModelLayers
from kleinserve.engine.lora_layers import AdaptedLinear, RowRouting, linear_shapes, plan_rows, wrap_layers
from kleinserve.engine.precision import Placer, choose_placement
from kleinserve.engine.tiny import create_tiny
from kleinserve.engine.tiny_lora import lora_projections, random_lora, write_lora
from kleinserve.types import GenerateRequest, LoraChoice

RESOLUTION = 256
TEXT_TOKENS = 512  # every prompt is padded to 512 tokens
REQUESTS = 4  # per batch in (a), each with its own adapter
RANKS = (16, 64)
SEED = 1000
Measure = Callable[[], float]  # runs one configuration once; returns seconds per image


def adapter_names(rank: int) -> list[str]:
    return [f"r{rank}-{i}" for i in range(REQUESTS)]


def write_adapters(folder: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """REQUESTS different adapters per rank, on every block projection, as diffusers-format files."""
    projections = lora_projections(shapes)
    for rank in RANKS:
        for seed, name in enumerate(adapter_names(rank)):
            factors = random_lora(shapes, projections, rank=rank, seed=rank * 100 + seed)
            write_lora(folder / f"{name}.safetensors", factors, projections, "diffusers")


class Bench(abc.ABC):
    """One size's two sides (bench/lora.py's docstring). `round` is set by the measuring loop; the first
    outputs of each (side, rank) are kept, so that `agreement` can show both sides did the same work."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.round = 0
        self.switch_seconds: dict[int, list[float]] = {rank: [] for rank in RANKS}  # diffusers, per request
        self.outputs: dict[tuple[str, int], list[Any]] = {}

    def configs(self) -> dict[str, Measure]:
        configs: dict[str, Measure] = {}
        for rank in RANKS:
            configs[f"batch r{rank}"] = functools.partial(self.batch, rank)
            configs[f"diffusers r{rank}"] = functools.partial(self.diffusers, rank)
            configs[f"one r{rank}"] = functools.partial(self.one, rank)
        configs["none after"] = functools.partial(self.none, wrapped=True)
        configs["none before"] = functools.partial(self.none, wrapped=False)
        configs["diffusers none"] = self.stock_none
        return configs

    def keep(self, side: str, rank: int, outputs: list[Any]) -> None:
        self.outputs.setdefault((side, rank), outputs)

    def agreement(self) -> dict[int, str]:
        """Per rank, how far kleinserve's batch outputs are from diffusers' (same inputs and adapters)."""
        return {
            rank: self.difference(self.outputs[("batch", rank)], self.outputs[("diffusers", rank)])
            for rank in RANKS
            if ("batch", rank) in self.outputs and ("diffusers", rank) in self.outputs
        }

    def diffusers(self, rank: int) -> float:
        """(a) diffusers: the REQUESTS requests one by one, each switching its adapter in and out; seconds
        per image = switching + the generation as `request` counts it."""
        total, outputs = 0.0, []
        for index, name in enumerate(adapter_names(rank)):
            start = time.perf_counter()
            self.load_adapter(self.folder / f"{name}.safetensors", name)
            switched = time.perf_counter()
            output, seconds = self.request(rank, index)
            unloading = time.perf_counter()
            self.unload_adapters()
            switch = switched - start + time.perf_counter() - unloading
            self.switch_seconds[rank].append(switch)
            total += switch + seconds
            outputs.append(output)
        self.keep("diffusers", rank, outputs)
        return total / REQUESTS

    @abc.abstractmethod
    def batch(self, rank: int) -> float:
        """(a) kleinserve: one batch of REQUESTS requests, each with its own adapter of `rank`."""

    @abc.abstractmethod
    def load_adapter(self, path: Path, name: str) -> None:
        """diffusers: load the file as adapter `name` and make it the only active one at scale 1."""

    @abc.abstractmethod
    def request(self, rank: int, index: int) -> tuple[Any, float]:
        """diffusers: request `index` of the batch alone, as loaded; (output, seconds for its image)."""

    @abc.abstractmethod
    def unload_adapters(self) -> None:
        """diffusers: remove every adapter (the model is the base model again)."""

    @abc.abstractmethod
    def one(self, rank: int) -> float:
        """(b) kleinserve: one request with one adapter of `rank`."""

    @abc.abstractmethod
    def none(self, wrapped: bool) -> float:
        """(c) kleinserve: one request without adapters, on wrapped layers or on a model never wrapped."""

    @abc.abstractmethod
    def stock_none(self) -> float:
        """diffusers without adapters, batch 1 (how kleinserve's base alone compares)."""

    @abc.abstractmethod
    def difference(self, ours: list[Any], theirs: list[Any]) -> str:
        """A phrase saying how far apart two sides' outputs are."""


class TinyBench(Bench):
    """Whole pipelines of the tiny model (bench/lora.py's docstring, `tiny`)."""

    def __init__(self, work: Path, dtype: torch.dtype, dtype_name: str) -> None:
        super().__init__(work / "loras")
        model = create_tiny(work / "tiny-random")
        self.stock = Flux2KleinPipeline.from_pretrained(model, dtype=dtype)
        self.stock.set_progress_bar_config(disable=True)
        write_adapters(self.folder, linear_shapes(self.stock.transformer))
        self.before = load_pipeline(str(model), dtype=dtype_name)
        self.after = load_pipeline(
            str(model), dtype=dtype_name, lora_dir=self.folder, lora_downloads=work / "downloads"
        )
        self.after.generate(self._request(PROMPTS[0], adapter_names(RANKS[0])[0]))  # wraps the layers

    def _request(self, prompt: str, adapter: str | None, seed: int = SEED) -> GenerateRequest:
        loras = (LoraChoice(adapter, 1.0),) if adapter else ()
        size = RESOLUTION
        return GenerateRequest(prompt=prompt, width=size, height=size, steps=STEPS, seed=seed, loras=loras)

    def _prompt(self, rank: int, index: int) -> str:
        """(a)'s prompts: new every round and rank (kleinserve's prompt cache never helps), shared by both
        sides within a round (their images compare)."""
        return f"{PROMPTS[index % len(PROMPTS)]} #{self.round}-{rank}"

    def batch(self, rank: int) -> float:
        requests = [
            self._request(self._prompt(rank, i), name, SEED + i) for i, name in enumerate(adapter_names(rank))
        ]
        start = time.perf_counter()
        results = self.after.generate_batch([self.after.resolve(r) for r in requests])
        seconds = time.perf_counter() - start
        self.keep("batch", rank, [result.images[0].image for result in results])
        return seconds / REQUESTS

    def load_adapter(self, path: Path, name: str) -> None:
        self.stock.load_lora_weights(str(path), adapter_name=name)
        self.stock.set_adapters([name], [1.0])

    def request(self, rank: int, index: int) -> tuple[Any, float]:
        return self._stock_image(self._prompt(rank, index), SEED + index)

    def unload_adapters(self) -> None:
        self.stock.unload_lora_weights()

    def _stock_image(self, prompt: str, seed: int) -> tuple[Any, float]:
        size, generator = RESOLUTION, torch.Generator("cpu").manual_seed(seed)
        start = time.perf_counter()
        image = self.stock(
            prompt=prompt,
            height=size,
            width=size,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            generator=generator,
        ).images[0]
        return image, time.perf_counter() - start

    def one(self, rank: int) -> float:
        return self._timed(self.after, adapter_names(rank)[0])

    def none(self, wrapped: bool) -> float:
        return self._timed(self.after if wrapped else self.before, None)

    def stock_none(self) -> float:
        return self._stock_image(PROMPTS[0], SEED)[1]

    def _timed(self, pipeline: Pipeline, adapter: str | None) -> float:
        request = self._request(PROMPTS[0], adapter)  # (b), (c): one prompt, whose embedding is cached
        start = time.perf_counter()
        pipeline.generate(request)
        return time.perf_counter() - start

    def difference(self, ours: list[Any], theirs: list[Any]) -> str:
        worst = max(
            int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
            for a, b in zip(ours, theirs, strict=True)
        )
        return f"max pixel difference {worst}/255"


class TransformerBench(Bench):
    """The klein-4B transformer with `blocks` (double, single) of its blocks (bench/lora.py's docstring)."""

    def __init__(self, work: Path, dtype: torch.dtype, dtype_name: str, blocks: tuple[int, int]) -> None:
        super().__init__(work / "loras")
        config = {**KLEIN_4B_TRANSFORMER, "num_layers": blocks[0], "num_single_layers": blocks[1]}
        with torch.device("meta"):
            self.stock = Flux2Transformer2DModel(**config)
        self.stock.eval().requires_grad_(False).to(dtype).to_empty(device="cpu")
        fill_deterministically(self.stock, torch.Generator().manual_seed(0))
        write_adapters(self.folder, linear_shapes(self.stock))
        # kleinserve's copy: its Linear layers as the engine places them (packed for oneDNN where it can).
        self.placed = copy.deepcopy(self.stock)
        stored = sum(p.numel() * p.element_size() for p in self.placed.parameters())
        placer = Placer(choose_placement(dtype=dtype_name).with_budget_now(), stored)
        placer.module(self.placed, "transformer")
        placer.finish()
        self.dtype, self.device = dtype, torch.device("cpu")
        layers = ModelLayers(linear_shapes(self.placed), dtype, self.device)
        self.library = AdapterLibrary(self.folder, work / "downloads", model=layers)
        self.routing = RowRouting()
        generator = torch.Generator().manual_seed(SEED)
        side = RESOLUTION // 16  # latent tokens per side after the VAE (8x) and the 2x2 patchify
        inputs = dict(
            hidden_states=torch.randn(REQUESTS, side * side, config["in_channels"], generator=generator),
            encoder_hidden_states=torch.randn(
                REQUESTS, TEXT_TOKENS, config["joint_attention_dim"], generator=generator
            ),
            timestep=torch.full((REQUESTS,), 0.5),
        )
        self.inputs = {key: value.to(dtype) for key, value in inputs.items()}
        self.ids = dict(img_ids=L.image_ids(side, side), txt_ids=L.text_ids(TEXT_TOKENS))
        start = time.perf_counter()
        names = [name for rank in RANKS for name in adapter_names(rank)]
        for name in names:
            self.wrap(self.library.load(name).factors)  # what a server does on an adapter's first use
        self.first_use_seconds = (time.perf_counter() - start) / len(names)

    def wrap(self, layers: Iterable[str]) -> None:
        """Wrap `layers` for adapters, as the engine does when an adapter first targets them."""
        wrap_layers(self.placed, sorted(layers), self.routing)

    def unwrap(self) -> None:
        """Put the base layers back in place of their AdaptedLinear wrappers: a model never wrapped."""
        for name, module in list(self.placed.named_modules()):
            if isinstance(module, AdaptedLinear):
                parent, _, attribute = name.rpartition(".")
                setattr(self.placed.get_submodule(parent), attribute, module.base)

    @torch.inference_mode()
    def forward(self, model: nn.Module, rows: slice) -> tuple[torch.Tensor, float]:
        """One forward of `rows` of the inputs; (velocity, seconds)."""
        start = time.perf_counter()
        inputs = {key: value[rows] for key, value in self.inputs.items()}
        output = model(**inputs, **self.ids, guidance=None, return_dict=False)[0]
        return output, time.perf_counter() - start

    def _kleinserve(self, choices: list[list[str]]) -> tuple[torch.Tensor, float]:
        """A batch of len(choices) rows, row i with adapter names choices[i] at scale 1, as the engine runs
        it: the adapters from the library's cache, the rows planned once, then STEPS forwards; (velocity,
        seconds per image)."""
        start = time.perf_counter()
        per_image = [[(self.library.load(name), 1.0) for name in names] for names in choices]
        groups = plan_rows(per_image, copies=1, dtype=self.dtype, device=self.device)
        planned = time.perf_counter() - start
        with self.routing.active(groups, batch=len(choices)):
            output, seconds = self.forward(self.placed, slice(0, len(choices)))
        return output, (planned + STEPS * seconds) / len(choices)

    def batch(self, rank: int) -> float:
        output, seconds = self._kleinserve([[name] for name in adapter_names(rank)])
        self.keep("batch", rank, list(output))
        return seconds

    def load_adapter(self, path: Path, name: str) -> None:
        # What Flux2KleinPipeline.load_lora_weights does for its transformer.
        state, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        self.stock.load_lora_adapter(state, adapter_name=name, metadata=metadata)
        self.stock.set_adapters([name], [1.0])

    def request(self, rank: int, index: int) -> tuple[Any, float]:
        output, seconds = self.forward(self.stock, slice(index, index + 1))
        return output[0], STEPS * seconds

    def unload_adapters(self) -> None:
        self.stock.unload_lora()  # what Flux2KleinPipeline.unload_lora_weights does for its transformer

    def one(self, rank: int) -> float:
        return self._kleinserve([adapter_names(rank)[:1]])[1]

    def none(self, wrapped: bool) -> float:
        if not wrapped:
            self.unwrap()
        try:
            return self._kleinserve([[]])[1]
        finally:
            self.wrap(self.library.load(adapter_names(RANKS[0])[0]).factors)

    def stock_none(self) -> float:
        return STEPS * self.forward(self.stock, slice(0, 1))[1]

    def difference(self, ours: list[Any], theirs: list[Any]) -> str:
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs, strict=True))
        return f"max |difference| / max |diffusers| of the velocity {worst:.1e}"
