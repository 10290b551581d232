"""LoRA adapters per request: each image equals diffusers' Flux2KleinPipeline with that request's adapters
loaded (`load_lora_weights`) and set (`set_adapters`) alone, same seed, within 1/255, also when one engine
call mixes requests with different adapters and requests with none. Bad adapters are a clear 400.

The adapters are tiny (engine/tiny_lora.py) in the three key conventions diffusers' FLUX.2 loader reads:
"ink" (rank 4, every block projection) in each, "moss" (rank 2, blocks and embedders, PEFT alpha 4 in
diffusers' metadata: a scale of 2).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors.torch import save_file

from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.engine.fp8 import Float8Linear
from kleinserve.engine.int8 import Int8Linear
from kleinserve.engine.lora import MAX_LORA_RANK, AdapterLibrary, LoadedAdapter, ModelLayers
from kleinserve.engine.lora_layers import AdaptedLinear, RowRouting, linear_shapes, plan_rows
from kleinserve.engine.precision import PackedLinear, WidenedLinear, can_pack
from kleinserve.engine.tiny_lora import lora_projections, random_lora, write_lora
from kleinserve.errors import EngineError, InvalidInput
from kleinserve.types import GenerateRequest, LoraChoice
from tests.conftest import max_difference, reference_image

GOOD = {"ink": 4, "ink-kohya": 4, "ink-bfl": 4, "moss": 2}  # name -> rank


def _request(*loras: tuple[str, float], seed: int = 3, **fields: object) -> GenerateRequest:
    choices = tuple(LoraChoice(name, scale) for name, scale in loras)
    return GenerateRequest(
        prompt="a lantern", width=64, height=64, steps=2, seed=seed, loras=choices, **fields
    )


@pytest.fixture(scope="module")
def shapes(tiny_dir: Path) -> dict[str, tuple[int, int]]:
    return linear_shapes(Flux2KleinPipeline.from_pretrained(tiny_dir).transformer)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, shapes: dict[str, tuple[int, int]]) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    blocks = lora_projections(shapes)
    ink = random_lora(shapes, blocks, rank=4, seed=1, strength=2.0)
    write_lora(folder / "ink.safetensors", ink, blocks, "diffusers")
    write_lora(folder / "ink-kohya.safetensors", ink, blocks, "kohya")
    write_lora(folder / "ink-bfl.safetensors", ink, blocks, "bfl")
    everything = lora_projections(shapes, edges=True)
    moss = random_lora(shapes, everything, rank=2, seed=2, strength=1.0)
    write_lora(folder / "moss.safetensors", moss, everything, "diffusers", alpha=4)
    _write_bad_adapters(folder, shapes)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    downloads = tmp_path_factory.mktemp("lora-downloads")
    return load_pipeline(str(tiny_dir), dtype="float32", lora_dir=lora_dir, lora_downloads=downloads)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, lora_dir: Path) -> Flux2KleinPipeline:
    """diffusers' pipeline of its own (the session's stays without adapters), every good adapter loaded."""
    pipeline = Flux2KleinPipeline.from_pretrained(tiny_dir)
    with warnings.catch_warnings():
        # PEFT warns that a second adapter makes "multiple adapters in the model": that is the point.
        warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
        for name in GOOD:
            pipeline.load_lora_weights(str(lora_dir), weight_name=f"{name}.safetensors", adapter_name=name)
    return pipeline


def _diffusers(reference: Flux2KleinPipeline, request: GenerateRequest, seed: int | None = None):
    """diffusers' image for `request` alone: its adapters set with their scales (none: LoRA disabled)."""
    if request.loras:
        reference.enable_lora()
        reference.set_adapters([c.adapter for c in request.loras], [c.scale for c in request.loras])
    else:
        reference.disable_lora()
    seed = request.seed if seed is None else seed
    assert request.width and request.height and request.steps and seed is not None
    guidance = request.guidance or 1.0
    return reference_image(
        reference, request.prompt, seed, request.width, request.height, request.steps, guidance
    )


def test_one_adapter_matches_diffusers(engine, reference, pipeline):
    request = _request(("ink", 1.0))
    image = engine.generate(request).images[0].image
    assert max_difference(image, _diffusers(reference, request)) <= 1
    plain = pipeline.generate(_request()).images[0].image
    assert max_difference(image, plain) > 10  # the adapter is visible


def test_two_adapters_with_different_scales_and_peft_alpha(engine, reference):
    request = _request(("ink", 0.7), ("moss", -1.5), seed=5)  # moss: alpha 4 / rank 2 in its metadata
    image = engine.generate(request).images[0].image
    assert max_difference(image, _diffusers(reference, request)) <= 1


def test_mixed_batch_in_one_call_equals_each_request_alone(engine, reference, pipeline):
    requests = [
        _request(("ink", 1.0), seed=1),
        _request(("moss", 1.0), seed=2),
        _request(seed=3),
        _request(("ink", 0.5), seed=4, num_images=2),
    ]
    results = engine.generate_batch([engine.resolve(request) for request in requests])
    for request, result in zip(requests, results, strict=True):
        for generated in result.images:
            expected = _diffusers(reference, request, seed=generated.seed)
            assert max_difference(generated.image, expected) <= 1, (request.loras, generated.seed)
    # Without adapters: exactly the pixels of a server without any, though the layers are now wrapped (in a
    # batch, within 1/255 as any batch: tests/engine/test_batching.py).
    plain = pipeline.generate(requests[2]).images[0].image
    assert max_difference(engine.generate(requests[2]).images[0].image, plain) == 0
    assert max_difference(results[2].images[0].image, plain) <= 1
    assert any(isinstance(m, AdaptedLinear) for m in engine.components.transformer.modules())
    assert len({engine.resolve(request).batch_key for request in requests[:3]}) == 1


def test_three_formats_give_the_same_pixels(engine, reference):
    names = ("ink", "ink-kohya", "ink-bfl")
    requests = [_request((name, 1.2), seed=7) for name in names]
    results = engine.generate_batch([engine.resolve(request) for request in requests])
    images = [result.images[0].image for result in results]
    assert max_difference(images[0], images[1]) <= 1 and max_difference(images[0], images[2]) <= 1
    assert max_difference(images[1], _diffusers(reference, requests[1])) <= 1  # diffusers' kohya reading
    assert [engine.adapters.describe(name).format for name in names] == [
        "diffusers",
        "kohya",
        "bfl",
    ]


def test_cfg_applies_adapters_to_both_halves(tiny_base_dir, lora_dir, tmp_path):
    engine = load_pipeline(str(tiny_base_dir), dtype="float32", lora_dir=lora_dir, lora_downloads=tmp_path)
    reference = Flux2KleinPipeline.from_pretrained(tiny_base_dir)
    reference.load_lora_weights(str(lora_dir), weight_name="ink-bfl.safetensors", adapter_name="ink-bfl")
    request = _request(("ink-bfl", 0.8), guidance=2.5)
    result = engine.generate(request)
    assert engine.resolve(request).use_cfg
    assert max_difference(result.images[0].image, _diffusers(reference, request)) <= 1


def _adapter(name: str, rank: int, features_in: int, features_out: int, seed: int) -> LoadedAdapter:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, features_in, generator=generator)
    b = torch.randn(features_out, rank, generator=generator)
    return LoadedAdapter(name, {"layer": (a, b)}, {"layer": 0.5} if seed % 2 else {}, a.numel() * 8)


@pytest.mark.parametrize("kind", ["packed", "widened", "int8", "float8"])
def test_adapted_layer_adds_each_rows_deltas_to_any_base(kind):
    linear = torch.nn.Linear(32, 24, bias=True)
    if kind == "packed" and not can_pack(torch.float32):
        pytest.skip("this CPU's oneDNN does not pack fp32")
    base = {
        "packed": lambda: PackedLinear(linear, torch.float32),
        "widened": lambda: WidenedLinear(linear.to(torch.bfloat16)),
        "int8": lambda: Int8Linear.quantize(linear),
        "float8": lambda: Float8Linear.quantize(linear, torch.float32),  # the CUDA path's, run here on CPU
    }[kind]()
    routing = RowRouting()
    layer = AdaptedLinear(base, "layer", routing)
    first, second = _adapter("first", 4, 32, 24, seed=1), _adapter("second", 2, 32, 24, seed=2)
    x = torch.randn(4, 5, 32)
    per_row = [[(first, 1.0)], [], [(first, -0.5), (second, 2.0)]]
    groups = plan_rows(per_row, 1, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        plain = base(x[:3])
        with routing.active(groups, batch=3):
            adapted = layer(x[:3])
        assert torch.equal(layer(x[:3]), plain)  # no groups: the base layer alone

    def delta(adapter: LoadedAdapter, rows: torch.Tensor) -> torch.Tensor:
        a, b = adapter.factors["layer"]
        return rows @ a.T @ b.T * adapter.scaling.get("layer", 1.0)

    close = {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(adapted[0], plain[0] + delta(first, x[0]), **close)
    assert torch.equal(adapted[1], plain[1])  # a row without adapters is untouched
    expected = plain[2] - 0.5 * delta(first, x[2]) + 2.0 * delta(second, x[2])
    torch.testing.assert_close(adapted[2], expected, **close)
    with routing.active(groups, batch=3), pytest.raises(EngineError, match="got 4 rows"):
        layer(x)


def _write_bad_adapters(folder: Path, shapes: dict[str, tuple[int, int]]) -> None:
    to_q = "transformer.transformer_blocks.0.attn.to_q"
    width = shapes["transformer_blocks.0.attn.to_q"][0]

    def pair(
        prefix: str, rank: int, features_in: int = width, kohya: bool = False
    ) -> dict[str, torch.Tensor]:
        a, b = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
        return {
            f"{prefix}.{a}.weight": torch.zeros(rank, features_in),
            f"{prefix}.{b}.weight": torch.zeros(width, rank),
        }

    files = {
        "bad-text-encoder": {**pair(to_q, 4), **pair("text_encoder.layers.0.self_attn.q_proj", 4)},
        "bad-unknown-layer": pair("transformer.transformer_blocks.7.attn.to_q", 4),
        "bad-kohya-keys": pair("lora_unet_double_blocks_0_img_attn_nope", 4, kohya=True),
        "bad-bfl-keys": pair("diffusion_model.double_blocks.0.img_attn.nope", 4),
        "bad-width": pair(to_q, 4, features_in=width + 8),
        "bad-rank": pair(to_q, MAX_LORA_RANK + 1),
    }
    for name, tensors in files.items():
        save_file(tensors, folder / f"{name}.safetensors")
    (folder / "bad-not-safetensors.safetensors").write_bytes(b"PK\x03\x04 this is a zip file")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("bad-not-safetensors", "is not a safetensors file"),
        ("bad-text-encoder", "has text-encoder keys (text_encoder.layers.0.self_attn.q_proj.lora_A.weight"),
        ("bad-unknown-layer", "adapts layers this model does not have (transformer_blocks.7.attn.to_q)"),
        ("bad-kohya-keys", "has unknown keys (lora_unet_double_blocks_0_img_attn_nope.lora_down.weight"),
        ("bad-bfl-keys", "cannot be read by diffusers' FLUX.2 LoRA loader"),
        ("bad-width", "does not fit this model: transformer_blocks.0.attn.to_q maps 32 to 32 features"),
        (
            "bad-rank",
            f"has rank {MAX_LORA_RANK + 1} at transformer_blocks.0.attn.to_q, over this server's cap",
        ),
    ],
)
def test_bad_adapters_are_refused_naming_the_problem(engine, lora_dir, name, problem):
    with pytest.raises(InvalidInput) as refused:
        engine.resolve(_request((name, 1.0)))
    assert refused.value.param == "loras" and refused.value.status == 400
    assert f"adapter {name!r} {problem}" in refused.value.message
    kept = set(engine.adapters.downloads.iterdir())
    with pytest.raises(InvalidInput, match="adapter 'sha256:"):
        engine.adapters.add((lora_dir / f"{name}.safetensors").read_bytes())
    assert set(engine.adapters.downloads.iterdir()) == kept  # nothing kept, not even a partial file


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ((("../loras/ink", 1.0),), "adapter name '../loras/ink' is not allowed"),
        ((("/etc/passwd", 1.0),), "adapter name '/etc/passwd' is not allowed"),
        ((("..", 1.0),), "adapter name '..' is not allowed"),
        ((("", 1.0),), "adapter name '' is not allowed"),
        ((("sha256:../../x", 1.0),), "adapter name 'sha256:../../x' is not allowed"),
        ((("missing", 1.0),), "no adapter 'missing'"),
        ((("ink", 4.5),), "scale 4.5 of adapter 'ink' is out of range (allowed: scales from -4 to 4)"),
        ((("ink", math.nan),), "scale nan of adapter 'ink' is out of range"),
        ((("ink", 1.0), ("ink", 0.5)), "adapter 'ink' given twice"),
        (tuple((name, 1.0) for name in [*GOOD, "ink"]), "5 adapters given (allowed: at most 4)"),
    ],
)
def test_requests_name_at_most_four_adapters_inside_the_folder(engine, loras, message):
    with pytest.raises(InvalidInput) as refused:
        engine.resolve(_request(*loras))
    assert refused.value.param == "loras" and message in refused.value.message


def test_a_server_without_adapters_refuses_them(pipeline):
    with pytest.raises(InvalidInput, match="this server applies no LoRA adapters") as refused:
        pipeline.resolve(_request(("ink", 1.0)))
    assert refused.value.param == "loras"


def test_listing_describes_the_usable_adapters(engine, lora_dir):
    infos = {info.name: info for info in engine.adapters.names()}
    assert sorted(infos) == sorted(GOOD)  # the bad files are left out (and logged)
    assert {name: info.rank for name, info in infos.items()} == GOOD
    ink = infos["ink"]
    assert ink.format == "diffusers" and ink.bytes == (lora_dir / "ink.safetensors").stat().st_size
    assert "transformer_blocks.0.attn.to_q" in ink.targets and "x_embedder" not in ink.targets
    assert "x_embedder" in infos["moss"].targets


def test_added_adapters_are_named_by_content_hash(engine, lora_dir):
    data = (lora_dir / "ink-kohya.safetensors").read_bytes()
    name = engine.adapters.add(data)
    assert name.startswith("sha256:") and engine.adapters.add(data) == name
    assert engine.adapters.describe(name).format == "kohya"
    by_name, by_hash = engine.generate_batch(
        [engine.resolve(_request((adapter, 1.0), seed=9)) for adapter in ("ink-kohya", name)]
    )
    assert max_difference(by_name.images[0].image, by_hash.images[0].image) <= 1


def test_cache_is_lru_bounded_by_bytes(engine, lora_dir, tmp_path):
    model = ModelLayers(engine.adapters.model.shapes, torch.float32, torch.device("cpu"))
    library = AdapterLibrary(lora_dir, tmp_path, cache_bytes=1, model=model)
    ink = library.load("ink")
    assert library.load("ink") is ink  # cached (over the cap, the last one loaded stays)
    library.load("moss")
    assert library.load("ink") is not ink  # evicted by moss
    roomy = AdapterLibrary(lora_dir, tmp_path, cache_bytes=1 << 30, model=model)
    ink, moss = roomy.load("ink"), roomy.load("moss")
    assert roomy.load("ink") is ink and roomy.load("moss") is moss
    assert ink.nbytes == sum(t.numel() * 4 for pair in ink.factors.values() for t in pair)


def test_an_adapter_on_the_float8_transformer(
    tiny_dir: Path, lora_dir: Path, engine: Pipeline, tmp_path: Path
) -> None:
    """quantize="fp8" (the CUDA path's Float8Linear, run here on the CPU) takes adapters as other bases do:
    the adapted image is the full-precision adapted one but for float8's drift (measured 3 / 255 at most),
    far from the unadapted one (122 / 255)."""
    quantized = load_pipeline(
        str(tiny_dir), dtype="float32", quantize="fp8", lora_dir=lora_dir, lora_downloads=tmp_path
    )
    adapted = _request(("ink", 1.0))
    eight = quantized.generate(adapted).images[0].image
    layers = quantized.components.transformer.modules()  # wrapped at the first request with an adapter
    assert any(isinstance(m, AdaptedLinear) and isinstance(m.base, Float8Linear) for m in layers)
    assert max_difference(eight, engine.generate(adapted).images[0].image) <= 8
    assert max_difference(eight, quantized.generate(_request()).images[0].image) >= 60
