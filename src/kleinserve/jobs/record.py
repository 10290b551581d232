"""The job record: what a job stores about its request (`JobParams`), its result (`JobResult`) and its usage
(`JobUsage`), as typed values, and the one JSON codec between them and the store's columns.

    params = JobParams.from_resolved(resolved)             # at submit, from the one resolution
    files = stored_images(resolved.stored)                 # kept beside the row (media.ReferenceStore)
    stored = params.to_request(files)                      # on the engine thread: engine.restore(stored)
    result = JobResult.from_result(generated, media_names)  # once the images are saved
    from_json(JobParams, to_json(params)) == params

The codec is derived from the dataclasses' fields: a field added to a record is written, read and (for
JobParams) carried from and to GenerateRequest with no other line. A row written before a field existed loads
with that field's default; a key no field knows (a row of a newer version) is ignored. The dialects read these
types, never the stored JSON; what clients see is each dialect's own wire model.
"""

from __future__ import annotations

import enum
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

from kleinserve.types import GenerateRequest, GenerateResult

if TYPE_CHECKING:  # not at run time: the store, and `kleinserve usage` with it, load no engine (torch)
    from _typeshed import DataclassInstance

    from kleinserve.engine.protocol import ResolvedRequest

Record = TypeVar("Record", bound="DataclassInstance")
STORED = "stored"  # field metadata: False keeps a field out of the JSON (it takes its default when read)


@dataclass(frozen=True, kw_only=True)
class JobParams(GenerateRequest):
    """What a job asked for, as resolved at submit (`ResolvedRequest.stored`): a GenerateRequest whose
    `width`/`height` (pixels), `steps`, `seed` (image i uses seed + i) and `max_sequence_length` (tokens) are
    the values used, so that a re-run after a restart is identical; `guidance` is as honoured (None: the
    variant's default, which a distilled variant always uses). `reference_sizes` are the (width, height) of
    each reference as prepared; the images themselves are files beside the row (media.ReferenceStore), never
    in it (`reference_images` is always empty here, and so is `mask`: `masked` says whether the last file is
    the mask; `stored_images` lists the files).

    A subclass, so that a field added to GenerateRequest is stored, read back and handed to the engine with no
    line here (tests/jobs/test_record.py::test_every_request_field_but_the_images_is_recorded)."""

    width: int
    height: int
    steps: int
    seed: int
    max_sequence_length: int
    reference_images: tuple[Image.Image, ...] = field(default=(), metadata={STORED: False})
    mask: Image.Image | None = field(default=None, metadata={STORED: False})
    reference_sizes: tuple[tuple[int, int], ...] = ()
    masked: bool = False

    @classmethod
    def from_resolved(cls, resolved: ResolvedRequest) -> JobParams:
        """The record of a resolved request; its images (`stored_images(resolved.stored)`) are kept apart, as
        files."""
        stored = resolved.stored
        values = {name: getattr(stored, name) for name in _request_fields()}
        sizes = tuple(reference.size for reference in resolved.references)
        return cls(**values, reference_sizes=sizes, masked=stored.mask is not None)

    def to_request(self, files: Sequence[Image.Image]) -> GenerateRequest:
        """The stored request (`ResolvedRequest.stored` as it was) with its images read back (`files`, as
        `stored_images` listed them: the prepared references, then the mask if `masked`), for
        `Engine.restore`."""
        values = {name: getattr(self, name) for name in _request_fields()}
        references, mask = (files[:-1], files[-1]) if self.masked else (files, None)
        return GenerateRequest(**values, reference_images=tuple(references), mask=mask)


def stored_images(stored: GenerateRequest) -> tuple[Image.Image, ...]:
    """The images a job keeps as files beside its row (`stored`: `ResolvedRequest.stored`): its prepared
    references, then its mask (an edit's, at the output size)."""
    return stored.reference_images + (() if stored.mask is None else (stored.mask,))


@dataclass(frozen=True, kw_only=True)
class JobImage:
    """One result image: its file in the media store and the seed that reproduces it alone."""

    media: str
    seed: int


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """A succeeded job's images and the parameters used: sizes in pixels, `prompt_tokens` as the text
    encoder read the prompt (0 in rows written before it was recorded)."""

    images: tuple[JobImage, ...]
    width: int
    height: int
    steps: int
    guidance: float
    prompt_tokens: int = 0

    @classmethod
    def from_result(cls, result: GenerateResult, media_names: Sequence[str]) -> JobResult:
        """The record of `result`, whose images were saved under `media_names` (in order)."""
        images = tuple(
            JobImage(media=name, seed=image.seed)
            for name, image in zip(media_names, result.images, strict=True)
        )
        return cls(
            images=images,
            width=result.width,
            height=result.height,
            steps=result.steps,
            guidance=result.guidance,
            prompt_tokens=result.prompt_tokens,
        )

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]


@dataclass(frozen=True, kw_only=True)
class JobUsage:
    """A succeeded job's metering (jobs/metering.py): images made, 512x512 tiles and megapixels in
    (references as prepared) and out, denoising steps, engine seconds, and adapter images (each image
    counted once per LoRA adapter applied to it; which adapters: the job's `params.loras`). Zero where a row
    lacks a figure."""

    images: int = 0
    tiles_in: int = 0
    tiles_out: int = 0
    megapixels_in: float = 0.0
    megapixels_out: float = 0.0
    steps: int = 0
    engine_seconds: float = 0.0
    adapter_images: int = 0


def to_json(record: DataclassInstance) -> dict[str, Any]:
    """`record` as JSON values, one key per field: records as objects, tuples as arrays, enums as values."""
    return {f.name: _encode(getattr(record, f.name)) for f in fields(record) if f.metadata.get(STORED, True)}


def from_json(kind: type[Record], data: Mapping[str, Any]) -> Record:
    """The `kind` record that `to_json` wrote as `data`, nested values built from the field annotations.
    A field missing from `data` takes its default (TypeError if it has none); unknown keys are ignored."""
    hints = _hints(kind)
    return kind(**{f.name: _decode(hints[f.name], data[f.name]) for f in fields(kind) if f.name in data})


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    if isinstance(value, tuple | list):
        return [_encode(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _decode(annotation: Any, value: Any) -> Any:
    """`value` (from JSON) as `annotation` says: X | None, tuple[X, ...], tuple[X, Y], a record, an enum,
    float (JSON writes 4.0 and 4 alike), or as it is."""
    if value is None:
        return None
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (argument for argument in arguments if argument is not type(None))
        return _decode(inner, value)
    if origin is tuple:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_decode(arguments[0], item) for item in value)
        return tuple(_decode(argument, item) for argument, item in zip(arguments, value, strict=True))
    if isinstance(annotation, type) and is_dataclass(annotation):
        return from_json(annotation, value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation(value)
    if annotation is float:
        return float(value)
    return value


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    """The resolved field annotations of a record class (the module postpones them as strings)."""
    return typing.get_type_hints(kind)


@functools.cache
def _request_fields() -> tuple[str, ...]:
    """GenerateRequest's fields but its images: what JobParams carries from and to a request by name."""
    return tuple(field.name for field in fields(GenerateRequest) if field.name not in _IMAGE_FIELDS)


_IMAGE_FIELDS = ("reference_images", "mask")  # files beside the row (stored_images), not JSON
