"""Per-row LoRA: a batch mixes requests with different adapters (S-LoRA/Punica style) and requests without.

    routing = RowRouting()
    wrap_layers(transformer, adapter.factors, routing)  # once per layer, when an adapter first targets it
    groups = plan_rows([[(a, 1.0)], [], [(a, 0.5), (b, 1.0)]], copies=1, dtype=dtype, device=device)
    with routing.active(groups, batch=3):
        transformer(...)  # row 0: a; row 1: the base model alone; row 2: a at 0.5 plus b

An adapted layer computes, for the rows i of the batch that use adapter j at scale s_ij,
`y_i = base(x_i) + sum_j s_ij * scaling_j * (x_i A_j^T) B_j^T`: PEFT's `lora_B(lora_A(x)) * scaling` added
adapter after adapter (the scale applied at rank width, before B: the same product, rounded in another
order, within the fidelity tests' 1/255), over the rows that use the adapter only (rows without adapters pay
nothing; a batch without adapters pays one check per adapted layer). The base layer stays whatever
`precision.Placer` made of it (packed, widened, int8) and its weights are never changed: nothing is
merged or unmerged.
Every transformer Linear this wraps takes the batch on dim 0 ((B, L, C) tokens or (B, C) embeddings), so a
row is an image; under CFG the batch is [cond | uncond] and an image's adapters apply to both of its rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kleinserve.engine.lora import LoadedAdapter
from kleinserve.engine.precision import LINEAR_KINDS
from kleinserve.errors import EngineError


def linear_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear below `module` (as loaded or as precision.Placer made it): name -> (in, out) features."""
    return {
        name: (child.in_features, child.out_features)
        for name, child in module.named_modules()
        if isinstance(child, LINEAR_KINDS)
    }


@dataclass(frozen=True)
class AdapterRows:
    """The rows of a batch that use one adapter: `rows` (k,) indices into the batch (None: every row) and
    `scales` (k,) each row's request scale, in the compute dtype."""

    adapter: LoadedAdapter
    rows: torch.Tensor | None
    scales: torch.Tensor


class RowRouting:
    """Which rows use which adapters for the transformer calls in progress; shared by every adapted layer
    of one transformer. Set and read on the engine thread only."""

    def __init__(self) -> None:
        self.groups: tuple[AdapterRows, ...] = ()
        self.batch = 0

    @contextlib.contextmanager
    def active(self, groups: tuple[AdapterRows, ...], batch: int) -> Iterator[None]:
        """`groups` apply to the transformer calls inside the block, whose batches have `batch` rows."""
        self.groups, self.batch = groups, batch
        try:
            yield
        finally:
            self.groups, self.batch = (), 0


def plan_rows(
    per_image: Sequence[Sequence[tuple[LoadedAdapter, float]]],
    copies: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[AdapterRows, ...]:
    """Group a batch's rows by adapter. `per_image[i]` are image i's (adapter, scale) pairs; the batch holds
    `copies` stacked copies of the images (2 under CFG), and each copy of an image uses its adapters. An
    adapter at scale 0 changes nothing and is skipped, as are adapters no row uses."""
    images = len(per_image)
    rows: dict[str, list[int]] = {}
    scales: dict[str, list[float]] = {}
    adapters: dict[str, LoadedAdapter] = {}
    for image, choices in enumerate(per_image):
        for adapter, scale in choices:
            if scale == 0:
                continue
            adapters[adapter.name] = adapter
            for copy in range(copies):
                rows.setdefault(adapter.name, []).append(image + copy * images)
                scales.setdefault(adapter.name, []).append(scale)
    groups = []
    for name, adapter in adapters.items():
        every_row = len(rows[name]) == images * copies
        index = None if every_row else torch.tensor(rows[name], dtype=torch.long, device=device)
        groups.append(AdapterRows(adapter, index, torch.tensor(scales[name], dtype=dtype, device=device)))
    return tuple(groups)


class AdaptedLinear(nn.Module):
    """A base Linear (any kind precision.Placer makes) plus the per-row LoRA of the active groups."""

    def __init__(self, base: nn.Module, name: str, routing: RowRouting) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.routing.groups
        if not groups:
            return y
        if x.shape[0] != self.routing.batch:
            # A Linear fed a flattened or broadcast batch would add one image's delta to another's rows.
            raise EngineError(f"{self.name} got {x.shape[0]} rows, the batch has {self.routing.batch}")
        broadcast = (-1,) + (1,) * (x.dim() - 1)
        for group in groups:
            pair = group.adapter.factors.get(self.name)
            if pair is None:
                continue
            a, b = pair
            rows = group.rows
            low = F.linear(x if rows is None else x.index_select(0, rows), a)  # (k, ..., rank)
            # Scaled at rank width, before B: a pass over (k, ..., rank) rather than over the output.
            low = low * (group.scales.view(broadcast) * group.adapter.scaling.get(self.name, 1.0))
            # Into `y` in place (the base layer's fresh output): a copy of it per adapter, or a separate
            # delta pass, would cost more than the adapter's own matmuls at low rank.
            if rows is None and y.is_contiguous():
                y.view(-1, y.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), b.t())
            elif rows is None:
                y += F.linear(low, b)
            else:
                y.index_add_(0, rows, F.linear(low, b))
        return y


def wrap_layers(transformer: nn.Module, names: Iterable[str], routing: RowRouting) -> None:
    """Wrap each named Linear of `transformer` in an AdaptedLinear on `routing`, once: a layer already
    wrapped is left as it is."""
    for name in names:
        layer = transformer.get_submodule(name)
        if isinstance(layer, AdaptedLinear):
            continue
        parent_name, _, attribute = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name), attribute, AdaptedLinear(layer, name, routing))
