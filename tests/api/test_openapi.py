"""/openapi.json as generated clients, fuzzers and /docs read it, from the live server: every POST's real
request body, no 422 where the server never answers one, error bodies that exist, a document whose
references all resolve; and a wrong method answered 405 with `Allow`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.openapi.models import OpenAPI

from tests.api.conftest import RunningServer

CLOUDFLARE_FIELDS = {"prompt", "width", "height", "seed", "input_image_0", "input_image_3"}
# POST path -> (content type, fields the body must describe, fields it must require)
REQUEST_BODIES = {
    "/v1/images/generations": ("application/json", {"prompt", "size", "n", "images", "stream"}, {"prompt"}),
    "/v1/images/edits": ("multipart/form-data", {"prompt", "size", "n", "image"}, {"prompt", "image"}),
    "/client/v4/accounts/{account_id}/ai/run/{model}": ("multipart/form-data", CLOUDFLARE_FIELDS, {"prompt"}),
    "/ai/run/{model}": ("multipart/form-data", CLOUDFLARE_FIELDS, {"prompt"}),
    "/image-model": ("application/json", {"prompt", "n", "size", "aspectRatio", "files"}, {"prompt"}),
    "/v1/{model}": ("application/json", {"prompt", "width", "input_image", "webhook_url"}, {"prompt"}),
}
BODILESS_POSTS = {"/v1/jobs/{job_id}/cancel"}
BFL_PATHS = {"/v1/{model}", "/v1/get_result"}  # BFL's validation errors really are 422


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def document(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    prefix = "#/components/schemas/"
    ref = schema.get("$ref", "")
    return document["components"]["schemas"][ref.removeprefix(prefix)] if ref.startswith(prefix) else schema


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_post_describes_its_request_body(document: dict[str, Any]) -> None:
    posts = {path for path, method, _ in operations(document) if method == "post"}
    assert posts == set(REQUEST_BODIES) | BODILESS_POSTS
    for path, (content_type, fields, required) in REQUEST_BODIES.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert list(body["content"]) == [content_type], path
        schema = body["content"][content_type]["schema"]
        assert "$ref" in schema, path  # a named schema in components: /docs and client generators show it
        described = resolve(document, schema)
        assert fields <= set(described["properties"]), (path, sorted(described["properties"]))
        assert set(described.get("required", [])) == required, path
    for path in BODILESS_POSTS:
        assert "requestBody" not in document["paths"][path]["post"]


def test_files_are_binary_fields(document: dict[str, Any]) -> None:
    edits = resolve(
        document,
        document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"][
            "schema"
        ],
    )
    assert edits["properties"]["image"]["items"] == {"type": "string", "format": "binary"}
    workers = resolve(document, {"$ref": "#/components/schemas/WorkersAIForm"})
    assert {"format": "binary", "type": "string"} in workers["properties"]["input_image_0"]["anyOf"]


def test_only_bfl_declares_422(document: dict[str, Any]) -> None:
    """Validation errors are 400 in every dialect but BFL's (422 `{"detail": [...]}`)."""
    for path, method, operation in operations(document):
        assert ("422" in operation["responses"]) == (path in BFL_PATHS), (method, path)
    bfl_422 = document["paths"]["/v1/{model}"]["post"]["responses"]["422"]["content"]["application/json"]
    assert bfl_422["schema"] == {"$ref": "#/components/schemas/BFLValidationError"}


@pytest.mark.parametrize(
    ("path", "statuses", "body"),
    [
        ("/v1/images/generations", {"400", "401", "404", "413", "429", "503"}, "ErrorBody"),
        ("/ai/run/{model}", {"400", "401", "413", "429", "503"}, "WorkersAIError"),
        ("/image-model", {"400", "401", "404", "413", "429", "503"}, "ErrorBody"),
        ("/v1/{model}", {"401", "404", "413", "422", "429", "503"}, "BFLError"),
    ],
)
def test_error_answers_are_declared_in_the_dialect_body(
    document: dict[str, Any], path: str, statuses: set[str], body: str
) -> None:
    responses = document["paths"][path]["post"]["responses"]
    assert set(responses) == {"200", "default"} | statuses
    assert responses["default"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + body)


def test_the_document_is_valid_and_every_reference_resolves(document: dict[str, Any]) -> None:
    OpenAPI.model_validate(document)  # FastAPI's own model of OpenAPI 3.1

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key == "$ref" else refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


@pytest.mark.parametrize(
    ("method", "path", "allowed", "dialect"),
    [
        ("GET", "/v1/images/generations", "POST", "openai"),
        ("PUT", "/image-model", "POST", "vercel"),
        ("GET", "/ai/run/@cf/black-forest-labs/flux-2-klein-4b", "POST", "cloudflare"),
        ("GET", "/v1/flux-2-klein-4b", "POST", "bfl"),
        ("DELETE", "/v1/jobs/some-job", "GET", "openai"),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: httpx.Client, method: str, path: str, allowed: str, dialect: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert allowed in [part.strip() for part in response.headers["allow"].split(",")]
    body = response.json()
    if dialect == "cloudflare":
        assert body["success"] is False and body["errors"][0]["code"] == 7000
    elif dialect == "bfl":
        assert body == {"detail": "Method Not Allowed"}
    else:
        assert body["error"]["message"] == "Method Not Allowed"
