"""The four dialects as pure functions (wire body -> GenerateRequest, KleinError -> answer) and the shared kit
(api/_dialect.py), then which dialect answers an error, over the shared test server: the route that matched,
not the path's prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi.responses import Response

from kleinserve.api import _dialect, bfl, cloudflare, openai, service, vercel
from kleinserve.api.openai_protocol import parse_fields
from kleinserve.engine.resolve import resolve_request
from kleinserve.engine.spec import ModelSpec
from kleinserve.errors import (
    EngineError,
    InvalidInput,
    KleinError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    StoreUnavailable,
    Unauthorized,
    UnknownModel,
)
from kleinserve.types import GenerateRequest, ImageFormat
from tests.api.conftest import RunningServer

DISTILLED = ModelSpec(
    name="flux-2-klein-4b", distilled=True, default_steps=4, default_guidance=1.0, parameters=0
)
BASE = ModelSpec(
    name="flux-2-klein-base-4b", distilled=False, default_steps=50, default_guidance=4.0, parameters=0
)


def honoured(request: GenerateRequest, spec: ModelSpec) -> tuple[int | None, float | None]:
    """(steps, guidance) of `request` that the variant of `spec` honours (None: the variant's own)."""
    resolved = resolve_request(request, spec).request
    return resolved.steps, resolved.guidance


# --- the kit ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("png", ImageFormat.PNG),
        ("JPG", ImageFormat.JPEG),
        ("jpeg", ImageFormat.JPEG),
        ("WebP", ImageFormat.WEBP),
    ],
)
def test_image_format_names(name: str, expected: ImageFormat) -> None:
    assert ImageFormat.parse(name) is expected


def test_unknown_image_format_names_the_param() -> None:
    with pytest.raises(InvalidInput, match="'gif'") as caught:
        ImageFormat.parse("GIF", param="format")
    assert caught.value.param == "format" and caught.value.allowed == "png, jpeg, webp"


@pytest.mark.parametrize("prompt", [None, "", "   \n", 7, "x" * (_dialect.MAX_PROMPT_CHARS + 1)])
def test_bad_prompts_are_one_error(prompt: object) -> None:
    with pytest.raises(InvalidInput, match="prompt") as caught:
        _dialect.check_prompt(prompt)
    assert caught.value.param == "prompt" and caught.value.allowed == "1-32000 characters"


def test_prompt_of_the_limit_passes_unchanged() -> None:
    prompt = " a" * (_dialect.MAX_PROMPT_CHARS // 2)
    assert _dialect.check_prompt(prompt) is prompt


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("abc", "not WIDTHxHEIGHT"),
        ("512.5x512", "not WIDTHxHEIGHT"),
        ("100x512", "out of range"),
        ("2048x1024", "2097152 pixels"),
    ],
)
def test_parse_size_refusals(text: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words) as caught:
        _dialect.parse_size(text, 1024 * 1024, param="dims")
    assert caught.value.param == "dims"


def test_parse_size_reads_either_case() -> None:
    assert _dialect.parse_size("1024X768", 1024 * 1024) == (1024, 768)


def test_pydantic_errors_name_the_field_without_its_source() -> None:
    with pytest.raises(InvalidInput) as caught:
        _dialect.parse_model(bfl.FluxKleinInputs, {"prompt": "x", "seed": -1})
    assert caught.value.param == "seed" and caught.value.message.startswith("seed: ")
    query = _dialect.invalid_input([{"loc": ("query", "limit"), "msg": "too small", "type": "x"}])
    assert (query.param, query.message) == ("limit", "limit: too small")


def test_error_headers() -> None:
    assert _dialect.error_headers(Overloaded("busy", retry_after=7)) == {"Retry-After": "7"}
    assert _dialect.error_headers(MethodNotAllowed("no", allowed=("GET", "HEAD"))) == {"Allow": "GET, HEAD"}
    assert _dialect.error_headers(NotFound("gone")) is None


# --- to_request: wire body -> GenerateRequest --------------------------------------------------------------


def test_openai_to_request() -> None:
    wire = parse_fields(
        {"prompt": "a fox", "size": "512x256", "n": 2, "seed": 5, "output_format": "jpg", "guidance_scale": 3}
    )
    request = openai.to_request(wire, [])
    assert (request.prompt, request.width, request.height) == ("a fox", 512, 256)
    assert (request.num_images, request.seed, request.guidance) == (2, 5, 3)
    assert request.output_format is ImageFormat.JPEG and request.output_quality == 100
    assert honoured(request, DISTILLED) == (None, None)  # distilled: guidance is the variant's
    ratio = openai.to_request(parse_fields({"prompt": "x", "aspect_ratio": "16:9"}), [])
    assert (ratio.width, ratio.height) == (1344, 768)
    auto = openai.to_request(parse_fields({"prompt": "x", "size": "auto"}), [])
    assert (auto.width, auto.height) == (None, None)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "x", "width": 2048, "height": 1024}, "width"),
        ({"prompt": "x", "width": 512}, "width"),
        ({"prompt": "x", "n": 2, "num_images": 3}, "n"),
        ({"prompt": "x", "quality": "hd", "size": "1x1"}, "size"),
    ],
)
def test_openai_to_request_refusals(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        openai.to_request(parse_fields(fields), [])
    assert caught.value.param == param


def test_vercel_to_request() -> None:
    body = {
        "prompt": "a fox",
        "n": 3,
        "size": "512x512",
        "seed": 1,
        "providerOptions": {"bfl": {"steps": 8, "guidance": 2.5, "output_format": "WEBP", "raw": True}},
    }
    warnings: list[dict[str, str]] = []
    options = vercel.provider_options(body, warnings)
    request = vercel.to_request(body, [], options)
    assert (request.width, request.height, request.num_images, request.seed) == (512, 512, 3, 1)
    assert (request.steps, request.guidance, request.output_format) == (8, 2.5, ImageFormat.WEBP)
    assert warnings == [{"type": "other", "message": "providerOptions.bfl.raw is ignored"}]
    assert honoured(request, BASE) == (8, 2.5)
    assert honoured(request, DISTILLED) == (None, None)
    ratio = vercel.to_request({"prompt": "x", "aspectRatio": "1:1"}, [], {})
    assert (ratio.width, ratio.height, ratio.output_format) == (1024, 1024, ImageFormat.PNG)


@pytest.mark.parametrize(
    ("body", "options", "param"),
    [
        ({"prompt": 3}, {}, "prompt"),
        ({"prompt": "x", "n": 5}, {}, "n"),
        ({"prompt": "x", "seed": -2}, {}, "seed"),
        ({"prompt": "x"}, {"output_format": "gif"}, "output_format"),
        ({"prompt": "x", "size": "4000x256"}, {}, "size"),
        ({"prompt": "x", "aspectRatio": "9:1"}, {}, "aspectRatio"),
    ],
)
def test_vercel_to_request_refusals(body: dict[str, Any], options: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        vercel.to_request(body, [], options)
    assert caught.value.param == param


def test_bfl_to_request() -> None:
    fields = {"prompt": "a fox", "width": 512, "height": 0, "seed": 3, "steps": 9, "guidance": 2}
    request = bfl.to_request(bfl.FluxKleinInputs.model_validate(fields), [])
    assert (request.width, request.height, request.seed) == (512, None, 3)  # 0: auto
    assert (request.steps, request.guidance) == (9, 2)
    assert request.output_format is ImageFormat.JPEG  # BFL's default
    assert honoured(request, BASE) == (9, 2)
    assert honoured(request, DISTILLED) == (None, None)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": " "}, "prompt"),
        ({"prompt": "x", "width": 32}, "width"),
        ({"prompt": "x", "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ],
)
def test_bfl_to_request_refusals(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        bfl.to_request(bfl.FluxKleinInputs.model_validate(fields), [])
    assert caught.value.param == param


def test_cloudflare_to_request() -> None:
    form = {"prompt": "a fox", "width": "512", "seed": "4", "steps": "20", "guidance": "3.5"}
    request = cloudflare.to_request(form, [], BASE)
    assert (request.width, request.height, request.seed) == (512, 768, 4)  # height: Cloudflare's default
    assert (request.steps, request.guidance, request.output_format) == (20, 3.5, ImageFormat.PNG)
    assert honoured(request, BASE) == (20, 3.5)
    assert honoured(request, DISTILLED) == (None, None)


@pytest.mark.parametrize(
    ("form", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "x", "width": "2000"}, "width"),
        ({"prompt": "x", "seed": "one"}, "seed"),
        ({"prompt": "x", "guidance": "lots"}, "guidance"),
    ],
)
def test_cloudflare_to_request_refusals(form: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        cloudflare.to_request(form, [], BASE)
    assert caught.value.param == param


# --- render_error: KleinError -> status, body, headers -----------------------------------------------------

BAD = InvalidInput("size 'x' is not WIDTHxHEIGHT", param="size", allowed='"1024x768"')
BUSY = Overloaded("the queue is full", retry_after=7)
NO_KEY = Unauthorized("invalid API key")
GONE = NotFound("no job 'j'")
BUG = KleinError("internal error (request id abc)")
ERRORS = {"invalid": BAD, "overloaded": BUSY, "unauthorized": NO_KEY, "not-found": GONE, "bug": BUG}


def answer(response: Response) -> tuple[int, Any, str | None]:
    return response.status_code, orjson.loads(bytes(response.body)), response.headers.get("retry-after")


def openai_style(exc: KleinError, kind: str) -> dict[str, Any]:
    param = exc.param if isinstance(exc, InvalidInput) else None
    return {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.code}}


@pytest.mark.parametrize(
    ("case", "status", "kind"),
    [
        ("invalid", 400, "invalid_request_error"),
        ("overloaded", 429, "invalid_request_error"),
        ("unauthorized", 401, "invalid_request_error"),
        ("not-found", 404, "invalid_request_error"),
        ("bug", 500, "server_error"),
    ],
)
def test_openai_render_error(case: str, status: int, kind: str) -> None:
    exc = ERRORS[case]
    assert answer(openai.render_error(exc)) == (status, openai_style(exc, kind), "7" if exc is BUSY else None)


@pytest.mark.parametrize(
    ("case", "status", "kind"),
    [
        ("invalid", 400, "invalid_request_error"),
        ("overloaded", 429, "rate_limit_exceeded"),
        ("unauthorized", 401, "authentication_error"),
        ("not-found", 404, "invalid_request_error"),
        ("bug", 500, "internal_server_error"),
    ],
)
def test_vercel_render_error(case: str, status: int, kind: str) -> None:
    exc = ERRORS[case]
    assert answer(vercel.render_error(exc)) == (status, openai_style(exc, kind), "7" if exc is BUSY else None)


def test_vercel_unknown_model_is_the_gateways_model_not_found() -> None:
    status, body, _ = answer(vercel.render_error(UnknownModel("model 'm'", param="model")))
    assert status == 404 and body["error"]["type"] == "model_not_found"


@pytest.mark.parametrize(
    ("case", "status", "code", "message"),
    [
        ("invalid", 400, 5006, f"AiError: Bad input: {BAD.message}"),
        ("overloaded", 429, 3040, BUSY.message),
        ("unauthorized", 401, 10000, NO_KEY.message),
        ("not-found", 404, 7000, GONE.message),
        ("bug", 500, 5000, BUG.message),
    ],
)
def test_cloudflare_render_error(case: str, status: int, code: int, message: str) -> None:
    exc = ERRORS[case]
    body = {"success": False, "errors": [{"code": code, "message": message}], "result": {}, "messages": []}
    assert answer(cloudflare.render_error(exc)) == (status, body, "7" if exc is BUSY else None)


@pytest.mark.parametrize(
    ("case", "status", "body"),
    [
        ("invalid", 422, {"detail": [{"loc": ["body", "size"], "msg": BAD.message, "type": "value_error"}]}),
        ("overloaded", 429, {"error": "rate_limit_exceeded", "message": BUSY.message, "retry_after": 7}),
        ("unauthorized", 401, {"detail": NO_KEY.message}),
        ("not-found", 404, {"detail": GONE.message}),
        ("bug", 500, {"detail": BUG.message}),
    ],
)
def test_bfl_render_error(case: str, status: int, body: dict[str, Any]) -> None:
    exc = ERRORS[case]
    assert answer(bfl.render_error(exc)) == (status, body, "7" if exc is BUSY else None)


def test_unavailable_carries_retry_after_in_every_dialect() -> None:
    outage = StoreUnavailable("database is locked", retry_after=3)
    for render in (openai.render_error, vercel.render_error, cloudflare.render_error, bfl.render_error):
        response = render(outage)
        assert (response.status_code, response.headers["retry-after"]) == (503, "3"), render


@pytest.mark.parametrize(
    ("exc", "kind"),
    [(EngineError("generation failed: boom"), "server_error"), (BAD, "invalid_request_error")],
)
def test_a_started_stream_sends_the_same_error_body(
    monkeypatch: pytest.MonkeyPatch, exc: KleinError, kind: str
) -> None:
    """Once an OpenAI stream has started, an error is its `error` event, in render_error's body."""

    async def fail(*_: object) -> None:
        raise exc

    async def events() -> list[str]:
        previews: asyncio.Queue[Any] = asyncio.Queue()
        request = openai.to_request(parse_fields({"prompt": "x"}), [])
        stream = openai._stream(None, None, None, request, previews, "image_generation")  # type: ignore[arg-type]
        return [event async for event in stream]

    monkeypatch.setattr(service, "finish", fail)
    (event,) = asyncio.run(events())
    name, data = event.strip().split("\n")
    assert name == "event: error"
    rendered = orjson.loads(bytes(openai.render_error(exc).body))
    assert orjson.loads(data.removeprefix("data: ")) == {"type": "error", **rendered}
    assert rendered["error"]["type"] == kind


# --- which dialect answers: the route that matched ---------------------------------------------------------


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        yield http


NO_SUCH_ENDPOINT = {
    "error": {
        "message": "no such endpoint",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
}


@pytest.mark.parametrize("path", ["/no/such/path", "/v1/images/variations", "/v1/get_result/x", "/v1/a/b"])
def test_a_path_no_route_serves_is_404_in_kleinservess_own_body(client: httpx.Client, path: str) -> None:
    for method in ("GET", "POST"):
        response = client.request(method, path)
        assert (response.status_code, response.json()) == (404, NO_SUCH_ENDPOINT), (method, path)


def test_cloudflare_claims_its_prefix_without_hiding_its_405(client: httpx.Client) -> None:
    unknown = client.put("/client/v4/accounts/acc/ai/models/search")
    assert unknown.status_code == 404
    assert unknown.json()["errors"] == [{"code": 7000, "message": "no such endpoint"}]
    wrong_method = client.get("/client/v4/accounts/acc/ai/run/@cf/black-forest-labs/flux-2-klein-4b")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["errors"][0]["code"] == 7000


def test_bfl_answers_a_model_it_does_not_serve(client: httpx.Client) -> None:
    response = client.post("/v1/flux-2-pro", json={"prompt": "x"})
    assert response.status_code == 404
    assert set(response.json()) == {"detail"} and "flux-2-pro" in response.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"), [("DELETE", "/v1/jobs", "GET"), ("PUT", "/v1/jobs/j/cancel", "POST")]
)
def test_405_names_the_allowed_methods_in_the_routes_dialect(
    client: httpx.Client, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405 and response.headers["allow"] == allowed
    expected = {"message": "Method Not Allowed", "type": "invalid_request_error", "param": None}
    assert response.json() == {"error": {**expected, "code": "method_not_allowed"}}


def test_a_bad_query_parameter_is_invalid_input_in_the_routes_dialect(client: httpx.Client) -> None:
    jobs = client.get("/v1/jobs", params={"limit": 0})
    assert jobs.status_code == 400 and jobs.json()["error"]["param"] == "limit"
    poll = client.get("/v1/get_result")  # BFL's: no id
    assert poll.status_code == 422 and poll.json()["detail"][0]["loc"] == ["body", "id"]


def test_get_result_says_task_not_found_only_for_a_missing_task(
    client: httpx.Client, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = server._server.config.app.state.worker.store

    def unavailable(*_: object) -> None:
        raise StoreUnavailable("database is locked")

    assert client.get("/v1/get_result", params={"id": "nope"}).json()["status"] == "Task not found"
    monkeypatch.setattr(store, "get", unavailable)
    response = client.get("/v1/get_result", params={"id": "nope"})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json() == {"detail": "database is locked"}
