"""The OpenAPI document (/openapi.json and /docs): each route's real request body and error answers.

Routes read the raw Request (each dialect parses its own body and answers errors in its own words through
app.py's one handler), so FastAPI sees no body and assumes its own 422 validation answer. Routes declare
instead, with what this module builds: `openapi_extra=json_body(Model)` or `multipart_body(Model, ...)` for
the request, and `responses=errors(Body, statuses)` for the error bodies their dialect answers with, at the
statuses that really happen. `document(app)` builds the document and files request schemas under
components, where /docs and client generators look for named types.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

REF = "#/components/schemas/{model}"
_STATUS_WORDS = {
    400: "Invalid input: the message names the parameter and what is allowed",
    401: "No API key, or not a valid one",
    404: "No such model or job",
    409: "The job has already ended",
    413: "The request body is over the size limit",
    422: "Invalid input (BFL's validation error body)",
    429: "The queue is full: try again after Retry-After seconds",
    503: "Shutting down, or the job store is unavailable: try again after Retry-After seconds",
}


# --- error bodies, per dialect (each module's render_error writes them) -----------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str = Field(description="OpenAI: invalid_request_error | server_error; Vercel: the Gateway's types")
    param: str | None = Field(description="the offending field, when there is one")
    code: str = Field(description="kleinserve's error code: invalid_input, overloaded, ...")


class ErrorBody(BaseModel):
    """OpenAI's error body, also answered by the job API and the Vercel AI Gateway route."""

    error: ErrorInfo


class WorkersAIMessage(BaseModel):
    code: int = Field(description="5006 bad input, 5007 no such model, 10000 auth, 3040 busy, 3006 too large")
    message: str


class WorkersAIError(BaseModel):
    """Cloudflare's v4 envelope with success false."""

    success: Literal[False]
    errors: list[WorkersAIMessage]
    result: dict[str, Any]
    messages: list[Any]


class BFLValidationDetail(BaseModel):
    loc: list[str]
    msg: str
    type: str


class BFLValidationError(BaseModel):
    detail: list[BFLValidationDetail]


class BFLRateLimit(BaseModel):
    error: Literal["rate_limit_exceeded"]
    message: str
    retry_after: int


class BFLError(BaseModel):
    detail: str


# --- what routes declare -----------------------------------------------------------------------------------


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is `model` as JSON."""
    return _body("application/json", model.model_json_schema(ref_template=REF))


def multipart_body(
    model: type[BaseModel], title: str | None = None, files: dict[str, str] | None = None
) -> dict[str, Any]:
    """`openapi_extra` for a multipart/form-data body: `model`'s fields as form fields, plus `files` (field
    name -> description: 1-4 files, the field repeated), under the schema name `title` (default: the
    model's)."""
    schema = model.model_json_schema(ref_template=REF)
    if title is not None:
        schema["title"] = title
    for name, description in (files or {}).items():
        binary = {"type": "string", "format": "binary"}
        schema["properties"][name] = {
            "type": "array",
            "items": binary,
            "maxItems": 4,
            "description": description,
        }
        schema.setdefault("required", []).append(name)
    return _body("multipart/form-data", schema)


def _body(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def errors(
    body: type[BaseModel], statuses: tuple[int, ...], special: dict[int, type[BaseModel]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """`responses` for a route: `body` at each of `statuses` (`special` bodies at theirs), and as `default`,
    any other error (a bug's 500). Declaring `default` also keeps FastAPI from adding its 422, which only
    BFL's routes answer (in their own body)."""
    bodies = {status: body for status in statuses} | (special or {})
    declared: dict[int | str, dict[str, Any]] = {
        status: {"model": model, "description": _STATUS_WORDS[status]}
        for status, model in sorted(bodies.items())
    }
    declared["default"] = {"model": body, "description": "Any other error (a bug: 500), in the same body"}
    return declared


# --- the document -------------------------------------------------------------------------------------------


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (built once): FastAPI's, with every request body's schema (and the schemas
    it refers to) under components/schemas and the body referring to it by name."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for operations in doc["paths"].values():
            for operation in operations.values():
                for media in operation.get("requestBody", {}).get("content", {}).values():
                    schema = media["schema"]
                    schemas.update(schema.pop("$defs", {}))
                    schemas[schema["title"]] = schema
                    media["schema"] = {"$ref": REF.format(model=schema["title"])}
        app.openapi_schema = doc
    return app.openapi_schema
