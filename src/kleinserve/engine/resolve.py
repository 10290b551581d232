"""Resolution: a GenerateRequest with the variant's defaults and policy applied and every value checked.

    resolved = resolve_request(GenerateRequest(prompt="a fox", steps=2), spec)
    resolved.steps, resolved.seeds, resolved.batch_key

Needs only the variant's `ModelSpec`, not the weights: callers refuse bad input before loading or queueing.
The policy itself (which values a variant fixes, its ranges) is stated in `ModelSpec`; this module applies it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from kleinserve.engine import spec as limits
from kleinserve.engine.inpaint import EditPlan, plan_edit
from kleinserve.engine.lora import MAX_LORA_SCALE, MAX_LORAS, AdapterLibrary
from kleinserve.engine.references import PreparedReference, prepare_reference, restore_reference
from kleinserve.engine.spec import ModelSpec
from kleinserve.errors import EngineError, InvalidInput
from kleinserve.types import MAX_SEED, GenerateRequest, LoraChoice


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default applied and every value checked; sizes are pixels.

    `request` is the request as the engine honours it: its references as 8-bit RGB at their given size, and
    `steps`/`guidance` that the variant overrode cleared to None; the dialects' job answers show its
    `guidance`. `stored` is what to keep to run it later: `restore_request(stored, spec)` rebuilds this
    resolution without checking or preparing anything again.
    """

    request: GenerateRequest
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    max_sequence_length: int
    references: tuple[PreparedReference, ...]
    use_cfg: bool
    edit: EditPlan | None = None  # inpainting / image-to-image: references[0] is the image edited

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can run as one batch; their LoRA adapters, masks and strengths may
        differ (edits batch with edits only: their first reference is also their starting point)."""
        guidance = self.guidance if self.use_cfg else None
        grids = tuple(r.grid for r in self.references)
        edit = self.edit is not None
        return (self.width, self.height, self.steps, guidance, self.max_sequence_length, grids, edit)

    @property
    def stored(self) -> GenerateRequest:
        """`request` with the resolved width, height, steps, seed (`seeds[0]`) and max_sequence_length, and
        its references as prepared (`PreparedReference.image`): the form `restore_request` takes."""
        return replace(
            self.request,
            width=self.width,
            height=self.height,
            steps=self.steps,
            seed=self.seeds[0],
            max_sequence_length=self.max_sequence_length,
            reference_images=tuple(reference.image for reference in self.references),
            mask=None if self.edit is None else self.edit.mask_image,
        )


def _check_range(value: float, low: float, high: float, param: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{param} {value!r} is not a number", param=param, allowed=f"{what} {low}-{high}")
    if not low <= value <= high:
        raise InvalidInput(f"{param} {value} is out of range", param=param, allowed=f"{what} {low}-{high}")


def _floor_side(value: int, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{param} must be an integer", param=param, allowed="integer pixels")
    _check_range(value, limits.MIN_SIDE, limits.MAX_SIDE, param, "pixels")
    return value - value % limits.SIZE_MULTIPLE


def resolve_request(
    request: GenerateRequest, spec: ModelSpec, adapters: AdapterLibrary | None = None
) -> ResolvedRequest:
    """Apply `spec`'s defaults and policy and check every value; raises InvalidInput naming the parameter.

    A value the variant fixes (`spec.guidance_fixed`; `spec.steps_fixed` for a request `fixed_by_variant`)
    is neither checked nor used, as the hosted APIs ignore it. `request.loras` must name adapters of
    `adapters` (`AdapterLibrary.check`), each once, at most MAX_LORAS, scales within +-MAX_LORA_SCALE.
    """
    if not 1 <= request.num_images <= limits.MAX_IMAGES_PER_REQUEST:
        raise InvalidInput(
            f"num_images {request.num_images} is out of range", param="num_images", allowed="1-4"
        )
    if len(request.reference_images) > limits.MAX_REFERENCE_IMAGES:
        raise InvalidInput(
            f"{len(request.reference_images)} reference images given",
            param="reference_images",
            allowed="at most 4",
        )
    _check_loras(request.loras, adapters)
    length = request.max_sequence_length or spec.max_sequence_length
    _check_range(length, 1, limits.MAX_SEQUENCE_LENGTH, "max_sequence_length", "tokens")
    references, edit = _prepared(request)
    default_width, default_height = references[0].size if references else (spec.default_side,) * 2
    width = _floor_side(request.width, "width") if request.width is not None else default_width
    height = _floor_side(request.height, "height") if request.height is not None else default_height
    if edit is not None and (width, height) != (default_width, default_height):
        raise InvalidInput(
            f"an edit with a mask or strength has its image's size, {default_width}x{default_height}, "
            f"not {width}x{height}",
            param="width" if width != default_width else "height",
            allowed=f"{default_width}x{default_height} or no size",
        )
    steps_asked = None if spec.steps_fixed and request.fixed_by_variant else request.steps
    steps = spec.default_steps if steps_asked is None else steps_asked
    _check_range(steps, *spec.steps_range, "steps", "steps")
    guidance_asked = None if spec.guidance_fixed else request.guidance
    guidance = spec.default_guidance
    if guidance_asked is not None:
        _check_range(guidance_asked, *spec.guidance_range, "guidance", "scale")
        guidance = float(guidance_asked)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    _check_range(seed, 0, MAX_SEED, "seed", "integer")
    honoured = replace(
        request,
        steps=steps_asked,
        guidance=guidance_asked,
        reference_images=tuple(reference.source for reference in references),
    )
    return ResolvedRequest(
        request=honoured,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seeds=tuple(seed + i for i in range(request.num_images)),
        max_sequence_length=length,
        references=references,
        use_cfg=_uses_cfg(spec, guidance),
        edit=edit,
    )


def _prepared(request: GenerateRequest) -> tuple[tuple[PreparedReference, ...], EditPlan | None]:
    """The request's references, prepared (engine/references.py; for an edit, engine/inpaint.py), and its
    edit plan (None without a mask or strength)."""
    if request.mask is None and request.strength is None:
        return tuple(prepare_reference(img, i) for i, img in enumerate(request.reference_images)), None
    return plan_edit(request.reference_images, request.mask, request.strength)


def _check_loras(loras: tuple[LoraChoice, ...], adapters: AdapterLibrary | None) -> None:
    if not loras:
        return
    if len(loras) > MAX_LORAS:
        raise InvalidInput(f"{len(loras)} adapters given", param="loras", allowed=f"at most {MAX_LORAS}")
    if adapters is None:
        raise InvalidInput(
            "this server applies no LoRA adapters", param="loras", allowed="none (the server's --lora-dir)"
        )
    for index, choice in enumerate(loras):
        scale = choice.scale
        numeric = isinstance(scale, int | float) and not isinstance(scale, bool)
        if not numeric or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:  # NaN fails the comparison
            raise InvalidInput(
                f"scale {scale!r} of adapter {choice.adapter!r} is out of range",
                param="loras",
                allowed=f"scales from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}",
            )
        if any(earlier.adapter == choice.adapter for earlier in loras[:index]):
            raise InvalidInput(
                f"adapter {choice.adapter!r} given twice", param="loras", allowed="each adapter once"
            )
        adapters.check(choice.adapter)


def restore_request(stored: GenerateRequest, spec: ModelSpec) -> ResolvedRequest:
    """The resolution whose `ResolvedRequest.stored` form `stored` is (a job's request, read back on the
    engine thread or after a restart), rebuilt without checking or preparing anything again: its values were
    checked when it was resolved, its references prepared (`restore_reference`; an edit's are prepared again,
    which leaves prepared images as they are). EngineError if a resolved value is missing: `stored` did not
    come from `ResolvedRequest.stored`."""
    guidance = spec.default_guidance if stored.guidance is None else float(stored.guidance)
    if stored.mask is not None or stored.strength is not None:
        references, edit = plan_edit(stored.reference_images, stored.mask, stored.strength)
    else:
        references, edit = tuple(restore_reference(image) for image in stored.reference_images), None
    seed = _resolved(stored.seed, "seed")
    return ResolvedRequest(
        request=stored,
        width=_resolved(stored.width, "width"),
        height=_resolved(stored.height, "height"),
        steps=_resolved(stored.steps, "steps"),
        guidance=guidance,
        seeds=tuple(seed + i for i in range(stored.num_images)),
        max_sequence_length=_resolved(stored.max_sequence_length, "max_sequence_length"),
        references=references,
        use_cfg=_uses_cfg(spec, guidance),
        edit=edit,
    )


def _resolved(value: int | None, name: str) -> int:
    if value is None:
        raise EngineError(f"a stored request has no resolved {name}")
    return value


def _uses_cfg(spec: ModelSpec, guidance: float) -> bool:
    # As in diffusers: CFG only for the base variants and only with a scale above 1.
    return spec.uses_cfg and guidance > 1.0


@dataclass(frozen=True)
class SpecResolver:
    """A variant's request checks without its weights: what a process that accepts jobs but runs no engine
    (`kleinserve api`) needs of the model."""

    spec: ModelSpec
    adapters: AdapterLibrary | None = None  # without a model: adapter files are checked, not their shapes

    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        return resolve_request(request, self.spec, self.adapters)
