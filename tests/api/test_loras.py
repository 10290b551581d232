"""LoRA adapters on the wire (issue 17, item 1): the `loras` value in each of the four dialects, adapter URLs
(`--allow-lora-urls`, https only, the outbound SSRF rules), and GET /v1/loras.

Adapters pass through to the job (read back with GET /v1/jobs/{id}); whether they change the pixels as
diffusers does is tests/engine/test_lora.py's subject. The adapter here is written in diffusers' PEFT layout
(`transformer.<module>.lora_A/B.weight`) for one projection of the tiny model, which is all a name needs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore
from kleinserve.api.loras import LoraItem, parse_loras
from kleinserve.api.server import ServerSettings
from kleinserve.cli import build_parser
from kleinserve.cli_serving import server_settings
from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.errors import InvalidInput
from tests.api.conftest import RunningServer, run_sdk, serve_in_thread
from tests.api.test_cloudflare import curl, short_url
from tests.conftest import random_image

TARGET = "transformer_blocks.0.attn.to_q"
RANK = 2
SMALL = {"size": "256x256", "num_inference_steps": 1}  # the cheapest image the OpenAI routes make
CHOSEN = [{"name": "fox", "scale": 0.5}, {"name": "owl"}]
RECORDED = [{"name": "fox", "scale": 0.5}, {"name": "owl", "scale": 1.0}]


def write_adapter(tiny_dir: Path, path: Path, seed: int) -> Path:
    """A rank-RANK adapter of TARGET in the diffusers/PEFT layout, shaped for the tiny model's weights."""
    with safe_open(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        out_features, in_features = weights.get_slice(f"{TARGET}.weight").get_shape()
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"transformer.{TARGET}.lora_A.weight": torch.randn(RANK, in_features, generator=generator),
        f"transformer.{TARGET}.lora_B.weight": torch.randn(out_features, RANK, generator=generator) * 0.01,
    }
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_adapter(tiny_dir, folder / "fox.safetensors", seed=0)
    write_adapter(tiny_dir, folder / "owl.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def lora_pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, lora_dir: Path) -> Pipeline:
    """The tiny model applying the adapters of `lora_dir` ("fox", "owl"), as `serve --lora-dir` loads it."""
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("lora-data"), lora_dir=lora_dir)
    return load_pipeline(
        str(tiny_dir), dtype="float32", lora_dir=lora_dir, lora_downloads=settings.lora_downloads
    )


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, lora_pipeline: Pipeline, lora_dir: Path
) -> Iterator[RunningServer]:
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("lora-data"), lora_dir=lora_dir)
    running = serve_in_thread(settings, lora_pipeline)
    yield running
    running.stop()


def recorded_loras(server: RunningServer, job_id: str | None = None) -> list[dict[str, Any]]:
    """The adapters recorded on job `job_id` (None: the newest job, for dialects that answer no id)."""
    if job_id is None:
        job = httpx.get(f"{server.base_url}/v1/jobs", params={"limit": 1}, timeout=30).json()["data"][0]
    else:
        job = httpx.get(f"{server.base_url}/v1/jobs/{job_id}", timeout=30).json()
    return job["params"]["loras"]


# --- the shape of a `loras` value -------------------------------------------------------------------------


def test_parse_loras_reads_arrays_json_text_and_nothing() -> None:
    given = [
        {"name": "fox", "scale": 0.5},
        {"url": "https://example.com/a.safetensors"},
        {"name": "x", "scale": -2},
    ]
    expected = [
        LoraItem("fox", None, 0.5),
        LoraItem(None, "https://example.com/a.safetensors", 1.0),
        LoraItem("x", None, -2.0),
    ]
    assert parse_loras(given) == expected
    assert parse_loras(json.dumps(given)) == expected  # a form field's text
    assert parse_loras(None) == parse_loras("") == parse_loras([]) == []


@pytest.mark.parametrize(
    ("value", "param", "words"),
    [
        ("not json", "loras", "not valid JSON"),
        ('[{"name": "a", "scale": NaN}]', "loras", "not valid JSON"),
        ({"name": "a"}, "loras", "must be an array"),
        ([{"name": "a"}] * 5, "loras", "5 adapters"),
        (["a"], "loras[0]", "not a name or URL object"),
        ([{"name": "a", "url": "https://x"}], "loras[0]", "exactly one of name and url"),
        ([{"name": "a"}, {"scale": 1}], "loras[1]", "exactly one of name and url"),
        ([{"name": "a", "weight": 1}], "loras[0]", "not a name or URL object"),
        ([{"name": " "}], "loras[0]", "non-empty text"),
        ([{"url": 7}], "loras[0]", "non-empty text"),
        ([{"name": "a", "scale": "1"}], "loras[0]", "is not a number"),
        ([{"name": "a", "scale": True}], "loras[0]", "is not a number"),
    ],
)
def test_malformed_loras_name_the_parameter(value: object, param: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words) as refused:
        parse_loras(value)
    assert refused.value.param == param


# --- each dialect passes its adapters to the job ---------------------------------------------------------


def test_openai_json_and_multipart_pass_loras(lora_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="unused")
    made = client.images.generate(
        model="flux-2-klein-4b", prompt="a fox", extra_body={**SMALL, "loras": CHOSEN}
    )
    assert recorded_loras(lora_server, made.model_extra["id"]) == RECORDED  # type: ignore[index]
    png = io.BytesIO()
    random_image(64, 64, seed=1).save(png, format="PNG")
    edited = client.images.edit(
        model="flux-2-klein-4b",
        image=("in.png", png.getvalue(), "image/png"),
        prompt="a fox",
        extra_body={**SMALL, "loras": json.dumps(CHOSEN)},  # a multipart text field holding the JSON
    )
    assert recorded_loras(lora_server, edited.model_extra["id"]) == RECORDED  # type: ignore[index]


def test_bfl_cloudflare_and_gateway_pass_loras(lora_server: RunningServer, node: str) -> None:
    base = lora_server.base_url
    body = {"prompt": "a fox", "width": 256, "height": 256, "loras": CHOSEN}
    submitted = httpx.post(f"{base}/v1/flux-2-klein-4b", json=body, timeout=30).json()
    assert recorded_loras(lora_server, submitted["id"]) == RECORDED  # recorded at submit, before it runs

    status, answer = curl(
        short_url(lora_server), "prompt=a fox", "width=256", "height=256", f"loras={json.dumps(CHOSEN)}"
    )
    assert status == 200, answer
    assert recorded_loras(lora_server) == RECORDED

    call = {"prompt": "a fox", "size": "256x256", "providerOptions": {"kleinserve": {"loras": CHOSEN}}}
    (result,) = run_sdk(node, "gateway", base, call)
    assert "error" not in result, result["error"]
    assert recorded_loras(lora_server) == RECORDED  # the SDK passes on no job id


def test_requests_without_loras_record_none(server: RunningServer) -> None:
    answer = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "x", **SMALL}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert recorded_loras(server, answer.json()["id"]) == []


# --- malformed values: a 400 in the caller's dialect, naming loras ---------------------------------------


def test_malformed_loras_are_refused_in_each_dialect(server: RunningServer) -> None:
    base = server.base_url
    both = [{"name": "a", "url": "https://example.com/a.safetensors"}]
    as_json = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "loras": both}, timeout=30)
    assert as_json.status_code == 400
    assert as_json.json()["error"]["param"] == "loras[0]"

    png = io.BytesIO()
    random_image(64, 64, seed=2).save(png, format="PNG")
    multipart = httpx.post(
        f"{base}/v1/images/edits",
        data={"prompt": "x", "loras": "[{"},
        files={"image": ("in.png", png.getvalue(), "image/png")},
        timeout=30,
    )
    assert multipart.status_code == 400
    assert multipart.json()["error"]["param"] == "loras"

    status, answer = curl(short_url(server), "prompt=x", 'loras={"name": "a"}')
    assert status == 400
    assert answer["errors"][0]["code"] == 5006 and "loras must be an array" in answer["errors"][0]["message"]

    bfl = httpx.post(f"{base}/v1/flux-2-klein-4b", json={"prompt": "x", "loras": [{"scale": 1}]}, timeout=30)
    assert bfl.status_code == 422
    assert bfl.json()["detail"][0]["loc"] == ["body", "loras[0]"]

    for options, param in (
        ({"loras": "fox"}, "providerOptions.kleinserve.loras"),
        ({"loras": [{}]}, "loras[0]"),
    ):
        body = {"prompt": "x", "providerOptions": {"kleinserve": options}}
        gateway = httpx.post(f"{base}/image-model", json=body, timeout=30)
        assert gateway.status_code == 400
        assert gateway.json()["error"]["param"] == param
        assert gateway.json()["error"]["type"] == "invalid_request_error"


# --- adapter URLs -----------------------------------------------------------------------------------------


def test_adapter_urls_are_refused_without_the_flag(server: RunningServer) -> None:
    body = {"prompt": "x", "loras": [{"url": "https://example.com/a.safetensors"}]}
    answer = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "loras[0]" and "--allow-lora-urls" in error["message"]


def test_adapter_urls_with_the_flag_are_https_and_public_only(
    tmp_path: Path, lora_pipeline: Pipeline
) -> None:
    running = serve_in_thread(ServerSettings(data_dir=tmp_path, allow_lora_urls=True), lora_pipeline)
    try:
        for url, words in (
            ("http://example.com/a.safetensors", "not https"),
            ("https://127.0.0.1:9/a.safetensors", "non-public address"),  # SSRF: refused before connecting
            ("https://10.1.2.3/a.safetensors", "non-public address"),
        ):
            body = {"prompt": "x", "loras": [{"url": url}]}
            answer = httpx.post(f"{running.base_url}/v1/images/generations", json=body, timeout=30)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == "loras[0]" and words in error["message"]
    finally:
        running.stop()


# --- GET /v1/loras ----------------------------------------------------------------------------------------


def test_get_loras_lists_the_folder(
    lora_server: RunningServer, lora_dir: Path, server: RunningServer
) -> None:
    listed = httpx.get(f"{lora_server.base_url}/v1/loras", timeout=30).json()
    fox, owl = listed["data"]
    assert owl["name"] == "owl"
    assert fox.keys() == {"name", "format", "rank", "targets", "bytes"}
    assert (fox["name"], fox["format"], fox["rank"]) == ("fox", "diffusers", RANK)
    assert [target for target in fox["targets"] if target.endswith(TARGET)]
    assert fox["bytes"] == (lora_dir / "fox.safetensors").stat().st_size
    assert httpx.get(f"{server.base_url}/v1/loras", timeout=30).json() == {"object": "list", "data": []}


def test_get_loras_needs_a_key(tmp_path: Path, start_server: Callable[..., RunningServer]) -> None:
    store = SqliteKeyStore(tmp_path / "data-0" / DATABASE_NAME)
    key = store.create("alice")
    store.close()
    running = start_server()
    assert httpx.get(f"{running.base_url}/v1/loras", timeout=30).status_code == 401
    authorised = httpx.get(
        f"{running.base_url}/v1/loras", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert authorised.status_code == 200


def test_cli_flags_reach_the_server_settings(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--lora-dir", str(tmp_path), "--allow-lora-urls"])
    settings = server_settings(args)
    assert (settings.lora_dir, settings.allow_lora_urls) == (tmp_path, True)
    default = server_settings(build_parser().parse_args(["serve"]))
    assert (default.lora_dir, default.allow_lora_urls) == (None, False)
