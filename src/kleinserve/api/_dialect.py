"""What the four dialects share: request checks in one wording, and errors answered in the matched route's
dialect.

Checks, each raising InvalidInput that names the parameter and what is allowed (`ImageFormat.parse` in
types.py reads format names):

    check_prompt(prompt)                 non-blank text of at most MAX_PROMPT_CHARS characters
    parse_size("1024x768", max_pixels)   a "WIDTHxHEIGHT" size; check_area caps width*height
    parse_model(Model, fields)           a pydantic wire model; invalid_input turns its errors into ours

Errors: each dialect's router builds its routes as a DialectRoute subclass (`APIRouter(route_class=...)`),
and app.py's one error handler answers any error raised while such a route handles a request with that
route's `render_error`. The route that matched picks the body, whatever the path looks like; a path no route
matches gets kleinserve's own body. `claim_prefix` lets a dialect answer unknown paths under its prefix
itself. `error_headers` and `error_body` are the parts of an answer that several dialects write alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.routing import Match
from starlette.types import Scope

from kleinserve.errors import InvalidInput, KleinError, MethodNotAllowed, NotFound, Overloaded

MAX_PROMPT_CHARS = 32000
MIN_SIDE, MAX_SIDE = 256, 2048  # pixels per side of a "WIDTHxHEIGHT" size
_PROMPT_ALLOWED = f"1-{MAX_PROMPT_CHARS} characters"
# Parts of FastAPI's error locations that say where a value came from, not which value it is.
_SOURCES = ("body", "query", "form")
_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

WireModel = TypeVar("WireModel", bound=BaseModel)


# --- request checks ---------------------------------------------------------------------------------------


def check_prompt(prompt: object) -> str:
    """`prompt` if it is text with a non-blank character and at most MAX_PROMPT_CHARS characters."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("prompt is missing or blank", param="prompt", allowed=_PROMPT_ALLOWED)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt has {len(prompt)} characters", param="prompt", allowed=_PROMPT_ALLOWED)
    return prompt


def check_area(width: int, height: int, max_pixels: int, param: str) -> tuple[int, int]:
    """(width, height) if width*height is at most `max_pixels`: each dialect applies one cap to every way of
    giving a size, so that none makes a larger image than another."""
    if width * height > max_pixels:
        raise InvalidInput(
            f"{param} {width}x{height} is {width * height} pixels",
            param=param,
            allowed=f"at most {max_pixels} pixels",
        )
    return width, height


def parse_size(text: str, max_pixels: int, param: str = "size") -> tuple[int, int]:
    """(width, height) in pixels of a "WIDTHxHEIGHT" size: MIN_SIDE-MAX_SIDE per side, `max_pixels` in all."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InvalidInput(
            f"{param} {text!r} is not WIDTHxHEIGHT", param=param, allowed='"1024x768" or "auto"'
        ) from None
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InvalidInput(
            f"{param} {text} is out of range", param=param, allowed=f"{MIN_SIDE}-{MAX_SIDE} px per side"
        )
    return check_area(width, height, max_pixels, param)


def parse_model(model: type[WireModel], fields: Mapping[str, Any]) -> WireModel:
    """`fields` validated as the wire model `model`; its first error as InvalidInput (see invalid_input)."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise invalid_input(exc.errors()) from None


def invalid_input(errors: Sequence[Mapping[str, Any]]) -> InvalidInput:
    """The first of pydantic's validation errors (a wire model's, or FastAPI's for query parameters) as
    InvalidInput: `param` is the value's dotted path, without FastAPI's "body"/"query"/"form" source."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part not in _SOURCES]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request"))
    return InvalidInput(f"{param}: {message}" if param else message, param=param)


# --- errors -----------------------------------------------------------------------------------------------


def error_headers(exc: KleinError) -> dict[str, str] | None:
    """Headers every dialect's error answer carries: Retry-After (whole seconds) when the request may be
    sent again later, Allow (the methods the path takes) with a 405."""
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, MethodNotAllowed):
        return {"Allow": ", ".join(exc.allowed)}
    return None


def error_body(exc: KleinError, kind: str) -> dict[str, Any]:
    """OpenAI's error body `{"error": {message, type, param, code}}`, which the AI Gateway route and
    kleinserve's own routes answer too; `kind` is the dialect's `type` for `exc`."""
    param = exc.param if isinstance(exc, InvalidInput) else None
    return {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.code}}


class DialectRoute(APIRoute, ABC):
    """A route of one dialect: app.py answers any error raised while it handles a request (its 405, a body
    over the limit and a bug's 500 included) with its `render_error`."""

    @abstractmethod
    def render_error(self, exc: KleinError) -> Response:
        """`exc` as the dialect answers it: status, body and headers."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.FULL and self.endpoint is _unrouted:
            # claim_prefix's catch-all ranks below every route: the router takes the first full match, and
            # only without one the first partial (a path served for other methods, which answers 405).
            return Match.PARTIAL, child_scope
        return match, child_scope


def claim_prefix(router: APIRouter, prefix: str) -> None:
    """Answer NotFound, in the router's dialect, for any request under `prefix` (ending in "/") that no route
    serves. Call it after adding the router's routes: of the routes that match a path only partially, the
    first answers, so a path they serve for other methods keeps their 405."""
    router.add_api_route(f"{prefix}{{path:path}}", _unrouted, methods=_EVERY_METHOD, include_in_schema=False)


async def _unrouted() -> Response:
    raise NotFound("no such endpoint")
