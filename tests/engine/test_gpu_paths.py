"""The CUDA path's code on the CPU at tiny size: compiled transformer blocks, float8 Linears, the CPU-only
tuning kept off CUDA placements, and bench/gpu.py end to end (every configuration, the checks and the HTTP
server), so that none of what an H200 run executes is untested syntax."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import kleinserve.engine as engine_module
from kleinserve.engine import Pipeline, choose_placement, load_pipeline, pipeline_from_components
from kleinserve.engine.compiled import is_compiled
from kleinserve.engine.fp8 import FP8, Float8Linear, quantize_rows
from kleinserve.engine.precision import PackedLinear, Placer
from kleinserve.types import GenerateRequest
from tests.conftest import max_difference
from tests.engine.test_precision import psnr

# Inductor's own imports warn (torch 2.13); the suite turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
REQUESTS = [
    GenerateRequest(prompt="a lighthouse at dusk", width=64, height=64, seed=11),
    GenerateRequest(prompt="two cats on a red sofa", width=64, height=64, seed=5),
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these tests share two cores with other work, and 2 OpenMP threads on a busy pair of
    cores made a tiny forward 60x slower (spinning barriers), one thread did not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def transformer_blocks(pipeline: Pipeline) -> list[nn.Module]:
    transformer = pipeline.components.transformer
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def test_compiled_blocks_give_the_eager_pixels(tiny_dir: Path, pipeline: Pipeline) -> None:
    compiled = load_pipeline(str(tiny_dir), dtype="float32", compile=True)
    blocks = transformer_blocks(compiled)
    assert compiled.components.placement.compile
    assert all(is_compiled(block) for block in blocks)
    # Inductor cannot lower oneDNN's packed Linear: compiled blocks keep plain weights, the rest is packed.
    assert not any(isinstance(m, PackedLinear) for block in blocks for m in block.modules())
    assert not is_compiled(compiled.components.text_encoder.layers[0])
    for request in REQUESTS:  # fp32: within 1/255 of the eager engine (and so of diffusers)
        image = compiled.generate(request).images[0].image
        assert max_difference(image, pipeline.generate(request).images[0].image) <= 1


def test_fp8_quantizes_the_transformer_blocks_only(tiny_dir: Path, pipeline: Pipeline) -> None:
    quantized = load_pipeline(str(tiny_dir), dtype="float32", quantize="fp8")
    assert quantized.components.placement.quantize == "fp8"
    layers = [
        m for block in transformer_blocks(quantized) for m in block.modules() if isinstance(m, Float8Linear)
    ]
    assert len(layers) == 12 + 2 * 2  # tiny: 1 double block (12 Linear), 2 single blocks (2 each)
    assert all(layer.weight.dtype == FP8 and layer.weight_scale.dtype == torch.float32 for layer in layers)
    assert not any(type(m) is nn.Linear for block in transformer_blocks(quantized) for m in block.modules())
    text_layers = quantized.components.text_encoder.layers
    assert not any(isinstance(m, Float8Linear) for m in text_layers.modules())
    # Measured on tiny-random at 64x64: PSNR 63.3-65.0 dB against fp32 (3 prompt/seed pairs); ~8 dB margin.
    for request in REQUESTS:
        decibels = psnr(
            pipeline.generate(request).images[0].image, quantized.generate(request).images[0].image
        )
        assert 55 <= decibels < float("inf"), decibels


def test_fp8_drift_on_the_toy_model() -> None:
    """The toy model's trained weights drift more than random ones: measured 44.8-49.5 dB at 128x128
    (3 prompt/seed pairs); the bound leaves ~7 dB of margin."""
    full = load_pipeline("flux-2-klein-toy", device="cpu", dtype="float32")
    quantized = load_pipeline("flux-2-klein-toy", device="cpu", dtype="float32", quantize="fp8")
    for seed, prompt in ((1, "a red circle on a blue background"), (2, "a green square")):
        request = GenerateRequest(prompt=prompt, width=128, height=128, seed=seed)
        decibels = psnr(full.generate(request).images[0].image, quantized.generate(request).images[0].image)
        assert 38 <= decibels < float("inf"), decibels


@pytest.mark.parametrize("bias", [True, False])
def test_float8_linear_is_the_dequantized_arithmetic(bias: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=generator) / 8)
        linear.weight[3] = 0  # an all-zero row quantizes to zeros, not NaN
    layer = Float8Linear.quantize(linear, torch.float32)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (1, 48)
    assert layer.nbytes < linear.weight.numel() * 4 / 3  # 1 byte a value, plus scales and bias
    assert torch.allclose(layer.dequantized_weight(), linear.weight, rtol=0.07, atol=1e-6)  # e4m3: 3 bits
    x = torch.randn(2, 5, 64, generator=generator)
    values, scales = quantize_rows(x.reshape(-1, 64))
    expected = (values.float() * scales) @ layer.dequantized_weight().t()
    if bias:
        expected = expected + linear.bias
    out = layer(x)
    assert out.shape == (2, 5, 48) and out.dtype == x.dtype
    assert torch.allclose(out, expected.reshape(2, 5, 48), atol=1e-5)
    assert not out[..., 3].isnan().any()


def test_cuda_placements_skip_the_cpu_tuning(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN packing, int8 and malloc tuning are the CPU's: a CUDA placement gets none of them (offload keeps
    the modules where they are, so that this runs without a GPU)."""
    cuda = choose_placement("cuda", quantize="fp8", offload=True)
    assert (cuda.dtype, cuda.quantize) == (torch.bfloat16, "fp8")
    block = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    placer = Placer(cuda, weight_bytes=0)
    assert placer._packer is None
    placer.block(block, "text_encoder.layers.0")
    assert [type(m) for m in block] == [nn.Linear, nn.Linear]  # neither packed nor converted
    placer.block(block, "transformer.transformer_blocks.0")
    assert [type(m) for m in block] == [Float8Linear, Float8Linear]  # fp8 is the GPU's own quantization

    tuned: list[bool] = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: tuned.append(True) or True)
    on_cuda = dataclasses.replace(pipeline.components, placement=cuda)
    pipeline_from_components(on_cuda)
    assert tuned == []
    pipeline_from_components(pipeline.components)
    assert tuned == [True]


def test_gpu_bench_runs_every_configuration_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [
        sys.executable,
        str(BENCH),
        *("--device", "cpu", "--size", "tiny", "--dtype", "float32", "--sides", "64", "--batches", "1"),
        *("--rounds", "1", "--clients", "2", "--requests", "1", "--threads", "1"),
        # The OpenAI dialect's smallest size is 256; an eager pipeline serves (no compilation of batch 2).
        *("--serve-config", "kleinserve", "--serve-side", "256", "--serve-max-batch", "2", "--out", str(out)),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OUT": str(tmp_path)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| kleinserve-fp8-compiled | 64 | 1 |" in completed.stdout
    assert (tmp_path / "gpu.md").read_text().startswith("| config |")
    results = json.loads(out.read_text())
    assert results["environment"]["torch"] == torch.__version__
    configs = results["configs"]
    assert set(configs) == {
        "stock",
        "kleinserve",
        "kleinserve-compiled",
        "kleinserve-fp8",
        "kleinserve-fp8-compiled",
    }
    for name, config in configs.items():
        run = config["runs"]["64x1"]
        assert len(run["steps"]) == 4, name
        for key in (
            "seconds",
            "text",
            "vae",
            "png",
            "warmup_seconds",
            "images_per_second",
            "peak_memory_bytes",
        ):
            assert run[key] > 0, (name, key)
        assert all(step > 0 for step in run["steps"]), name
    checks = results["checks"]["64"]
    # fp32 on the CPU: kleinserve equals diffusers, compiled equals eager (within 1/255).
    assert checks["diffusers_bf16_vs_fp32_max_difference"] == 0  # --dtype float32: both sides are fp32
    assert checks["kleinserve_vs_stock_max_difference"] <= 1
    assert checks["compiled_vs_eager_max_difference"] <= 1
    for fp8 in ("kleinserve-fp8", "kleinserve-fp8-compiled"):
        assert 50 <= checks[f"{fp8}_psnr_vs_bf16"] < float("inf")
        assert 50 <= checks[f"{fp8}_psnr_vs_fp32"] < float("inf")
    server = configs["kleinserve"]["server"]
    assert server["requests"] == 2 and server["images_per_second"] > 0 and server["p95_seconds"] > 0


def test_gpu_bench_report_at_the_sizes_of_an_h200_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's 1024x1024 verdicts (which a tiny CPU run never reaches), on made-up figures."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    report = importlib.import_module("gpu_report")
    run = {"seconds": 0.25, "text": 0.01, "steps": [0.05] * 4, "vae": 0.03, "png": 0.02}
    run |= {"warmup_seconds": 40.0, "images_per_second": 4.0, "peak_memory_bytes": 14 << 30}
    server = {"side": 1024, "clients": 8, "max_batch": 4, "images_per_second": 5.0}
    results = {
        "configs": {
            "stock": {"runs": {"1024x1": run | {"seconds": 0.55}}},
            "kleinserve-compiled": {
                "runs": {"1024x1": run},
                "server": server | {"p50_seconds": 1.5, "p95_seconds": 2},
            },
            "kleinserve-fp8-compiled": {"error": "InductorError: ..."},
            "kleinserve-fp8": {"skipped": "time budget of 450 s spent"},
        },
        "checks": {
            "1024": {"kleinserve_vs_stock_max_difference": 3, "diffusers_bf16_vs_fp32_max_difference": 9}
        },
    }
    lines = report.target_lines(results)
    assert lines[0].startswith("kleinserve-compiled: 0.270 s end to end at 1024x1024, 2.11x stock (0.570 s)")
    assert lines[0].endswith("target <= 0.3 s: MET")
    assert lines[1] == "bf16 pixels at 1024: 3/255 from stock, bound 9/255: MET"
    table = report.markdown(results)
    assert "| kleinserve-fp8-compiled | - | - | InductorError: ... |" in table
    assert "| kleinserve-compiled | 1024 | 1 | 0.250 | 4.00 |" in table
    assert "5.00 images/s, p50 1.500 s" in table
