"""Precision policy on the CPU: bf16 storage with fp32 compute is exact, int8 drifts by a bounded amount, and
choose_placement rejects what it cannot do."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kleinserve.cli_options import add_model_options
from kleinserve.engine import Pipeline, choose_placement, load_pipeline
from kleinserve.engine.int8 import Int8Linear, Prepacker
from kleinserve.engine.loading import inspect_source, resolve_source
from kleinserve.engine.precision import QUANTIZATIONS, Placement, can_pack, choose_load_dtype
from kleinserve.errors import InvalidInput
from kleinserve.types import GenerateRequest
from tests.conftest import max_difference, pixels


def cpu_flags() -> set[str]:
    """This CPU's feature flags, as /proc/cpuinfo names them."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


REQUEST = GenerateRequest(prompt="a lighthouse at dusk", width=64, height=64, seed=11)
BF16_FILES = (
    Path("transformer") / "diffusion_pytorch_model.safetensors",
    Path("text_encoder") / "model.safetensors",
)
VAE_FILE = Path("vae") / "diffusion_pytorch_model.safetensors"

# torch.quantize_per_tensor (called by quantize_dynamic) warns that quantized dtypes are deprecated; pyproject
# only ignores the torch.ao.quantization DeprecationWarning, and filterwarnings=error would turn this one into
# an exception inside load_pipeline(quantize="int8").
QUANTIZED_DTYPE_WARNING = "ignore:torch.quantize_per_tensor.*:UserWarning"


def linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a module standing in for one (it keeps in_features/out_features)."""
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def unparametrized(name: str) -> str:
    """`a.parametrizations.weight.original` -> `a.weight` (torch.nn.utils.parametrize's naming)."""
    return name.replace("parametrizations.", "").replace(".original", "")


def block_modules(pipeline: Pipeline) -> list[nn.Module]:
    transformer = pipeline.components.transformer
    return [
        *transformer.transformer_blocks,
        *transformer.single_transformer_blocks,
        *pipeline.components.text_encoder.layers,
    ]


def psnr(a, b) -> float:
    mse = float(np.mean((pixels(a).astype(np.float64) - pixels(b)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# --- bf16 storage, fp32 compute ---------------------------------------------------------------------------


def bf16_copy(tiny_dir: Path, destination: Path, files: tuple[Path, ...]) -> Path:
    shutil.copytree(tiny_dir, destination)
    for relative in files:
        path = destination / relative
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        state = {key: value.to(torch.bfloat16) for key, value in load_file(str(path)).items()}
        save_file(state, str(path), metadata=metadata)
    return destination


@pytest.fixture(scope="module")
def bf16_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its transformer and text encoder stored in bf16 (the VAE stays fp32)."""
    return bf16_copy(tiny_dir, tmp_path_factory.mktemp("bf16") / "klein", BF16_FILES)


@pytest.fixture(scope="module")
def bf16_all_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every weight stored in bf16, VAE included, as in black-forest-labs/FLUX.2-klein-4B."""
    return bf16_copy(tiny_dir, tmp_path_factory.mktemp("bf16") / "klein", (*BF16_FILES, VAE_FILE))


def test_bf16_checkpoint_is_seen_as_bf16(bf16_dir: Path) -> None:
    info = inspect_source(resolve_source(str(bf16_dir)))
    assert info.stored_dtypes == {"transformer": "BF16", "text_encoder": "BF16", "vae": "F32"}
    assert info.stored_16bit("transformer") and not info.stored_16bit("vae")


def weights_not_as_stored(pipeline: Pipeline, directory: Path) -> list[str]:
    """Names of the tensors a loaded pipeline holds whose values differ from the files' values.

    Widening is exact, so fp32 compute must see exactly the stored numbers; a weight read from an fp32 file
    must never pass through bf16 on the way (that rounds it). Tensors the precision policy turned into
    something else (packed or quantized Linear weights) are not in the state dicts and not compared here.
    """
    files = {
        "transformer": (directory / BF16_FILES[0], ""),
        "text_encoder": (directory / BF16_FILES[1], "model."),
        "vae": (directory / VAE_FILE, ""),
    }
    differing, compared = [], 0
    for component, (path, prefix) in files.items():
        stored = load_file(str(path))
        for key, value in getattr(pipeline.components, component).state_dict().items():
            name = prefix + unparametrized(key)
            if name in stored:
                compared += 1
                if not torch.equal(value.float(), stored[name].float()):
                    differing.append(f"{component}.{key}")
    assert compared > 100
    return differing


@pytest.mark.parametrize("model", ["bf16_dir", "bf16_all_dir"])
def test_bf16_storage_with_fp32_compute_is_exact(model: str, request: pytest.FixtureRequest) -> None:
    directory = request.getfixturevalue(model)
    roomy = load_pipeline(str(directory), dtype="float32", memory_budget_gib=64)
    cramped = load_pipeline(str(directory), dtype="float32", memory_budget_gib=1e-6)

    # Enough memory: no weight is left in bf16.
    for component in ("transformer", "text_encoder", "vae"):
        for name, param in getattr(roomy.components, component).named_parameters():
            assert param.dtype == torch.float32, f"{component}.{name}"
    # No memory to spare: the blocks' Linear weights stay bf16 in memory and are widened when used (through a
    # parametrization or a widening Linear); 16-bit tensors belong to Linear layers only, and the VAE is fp32.
    transformer = cramped.components.transformer
    sixteen_bit = {
        unparametrized(name) for name, p in transformer.named_parameters() if p.dtype == torch.bfloat16
    }
    block_linear_weights = {
        f"{name}.weight"
        for name, module in transformer.named_modules()
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and is_linear(module)
    }
    assert block_linear_weights and block_linear_weights <= sixteen_bit
    assert all(is_linear(transformer.get_submodule(name.rpartition(".")[0])) for name in sixteen_bit)
    for param in cramped.components.vae.parameters():
        assert param.dtype == torch.float32

    # Both compute with exactly the stored numbers...
    for pipeline in (roomy, cramped):
        differing = weights_not_as_stored(pipeline, directory)
        assert not differing, f"{len(differing)} weights differ from the files, e.g. {differing[:3]}"
    # ...but not necessarily through the same matmul kernel (weights widened once may be pre-packed for
    # oneDNN, weights widened per use go through F.linear), so float rounding may differ: measured max 1/255
    # over 16 prompt/seed pairs. A rounded weight shows as 3 and more.
    roomy_image = roomy.generate(REQUEST).images[0].image
    assert max_difference(roomy_image, cramped.generate(REQUEST).images[0].image) <= 1


def test_weights_are_packed_where_the_cpu_can(bf16_all_dir: Path) -> None:
    # bf16 weights computed in bf16: packing replaces each weight by a copy of the same size, so it is done
    # even with no memory to spare (at 4B the spare memory had come out negative and nothing was packed).
    # A CPU whose oneDNN cannot pack bf16 (AVX2 only) computes unpacked; loading there used to die.
    cramped = load_pipeline(str(bf16_all_dir), dtype="bfloat16", memory_budget_gib=1e-6)
    expected = "PackedLinear" if can_pack(torch.bfloat16) else "WidenedLinear"
    for component in ("transformer", "text_encoder"):
        kinds = {
            type(module).__name__
            for name, module in getattr(cramped.components, component).named_modules()
            if "Linear" in type(module).__name__
        }
        assert kinds == {expected}, (component, kinds)
    flags = cpu_flags()
    assert can_pack(torch.bfloat16) == bool(
        {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    ), sorted(flags)
    assert can_pack(torch.float32)
    image = cramped.generate(GenerateRequest(prompt="packed or not", width=64, height=64, steps=1, seed=0))
    assert image.images[0].image.size == (64, 64)


def test_the_automatic_budget_is_measured_before_the_weights_are_loaded(tiny_dir: Path) -> None:
    before = choose_placement("cpu", "float32").budget()
    loaded = load_pipeline(str(tiny_dir), device="cpu", dtype="float32").components.placement
    assert loaded.memory_budget is not None  # frozen at load time, not re-measured with the weights in RAM
    assert abs(loaded.memory_budget - before) < 256 << 20


# --- int8 -------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(QUANTIZED_DTYPE_WARNING)
def test_int8_quantizes_block_linears_and_drift_is_bounded(tiny_dir: Path, pipeline: Pipeline) -> None:
    quantized = load_pipeline(str(tiny_dir), quantize="int8")
    assert quantized.components.placement.quantize == "int8"
    blocks = block_modules(quantized)
    dynamic = [m for block in blocks for m in block.modules() if isinstance(m, Int8Linear)]
    # tiny: 1 double block (12 Linear), 2 single blocks (2 each), 27 Qwen3 layers (7 each).
    assert len(dynamic) == 12 + 2 * 2 + 27 * 7
    assert all(m.weight_and_bias()[0].dtype == torch.qint8 for m in dynamic)
    assert not any(linears(block) for block in blocks)  # no float Linear left in any block

    size = GenerateRequest(prompt=REQUEST.prompt, width=96, height=64, seed=REQUEST.seed)
    result = quantized.generate(size)
    assert (result.width, result.height) == (96, 64)
    assert result.images[0].image.size == (96, 64)

    # The drift report in test form: full precision vs int8 for a few requests. Measured on the tiny model
    # (12 prompt/seed pairs): PSNR 48.7-54.3 dB (mean 51.4) with every Linear quantized, 65.0-67.7 dB with
    # only the blocks' Linear layers quantized. The bound leaves ~5 dB of margin below the current minimum.
    values = []
    for seed, prompt in ((11, REQUEST.prompt), (0, "a fox"), (5, "two cats on a red sofa")):
        request = GenerateRequest(prompt=prompt, width=64, height=64, seed=seed)
        values.append(
            psnr(pipeline.generate(request).images[0].image, quantized.generate(request).images[0].image)
        )
    assert all(value >= 44 for value in values), values
    assert any(value < float("inf") for value in values), "int8 gave bit-identical pixels: not quantized?"


@pytest.mark.filterwarnings(QUANTIZED_DTYPE_WARNING)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_torch_ao(bias: bool) -> None:
    """Int8Linear is torch.ao's dynamic quantization without its module (whose constructor prepacks a zero
    weight first, doubling the packing time at load): the same int8 weight and scale, the same outputs."""
    generator = torch.Generator().manual_seed(3)
    linear = nn.Linear(96, 40, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=generator) / 10)
    ours = Int8Linear.quantize(linear)
    widened = nn.Linear(96, 40, bias=bias)
    widened.load_state_dict({key: value.float() for key, value in linear.state_dict().items()})
    widened.qconfig = torch.ao.quantization.default_dynamic_qconfig  # type: ignore[assignment]
    reference = torch.ao.nn.quantized.dynamic.Linear.from_float(widened)
    weight = ours.weight_and_bias()[0]
    assert torch.equal(weight.int_repr(), reference.weight().int_repr())
    assert weight.q_scale() == reference.weight().q_scale()
    x = torch.randn(3, 7, 96, generator=generator)
    assert torch.equal(ours(x), reference(x))
    packer = Prepacker(threads=2)
    in_background = Int8Linear.quantize(linear, packer)
    packer.finish()
    assert torch.equal(in_background(x), reference(x))


# --- choose_placement -------------------------------------------------------------------------------------


def test_choose_placement_defaults_and_overrides() -> None:
    automatic = choose_placement("cpu")
    assert automatic.device == torch.device("cpu")
    assert automatic.dtype in (torch.float32, torch.bfloat16)  # fp32, or bf16 on CPUs with bf16 matmul units
    assert choose_placement("cpu", quantize="int8").dtype == torch.float32  # int8 keeps fp32 activations
    assert choose_placement("cuda").dtype == torch.bfloat16
    assert choose_placement("cpu", "float32") == Placement(torch.device("cpu"), torch.float32)
    assert choose_placement("cpu", "bf16").dtype == torch.bfloat16
    assert choose_placement("cpu", "float16").dtype == torch.float16
    assert choose_placement("cpu", memory_budget_gib=0.5).memory_budget == 1 << 29


def test_choose_load_dtype() -> None:
    cpu = choose_placement("cpu", "float32", memory_budget_gib=1)
    gib = 1 << 30
    assert choose_load_dtype(cpu, gib // 2, stored_16bit=True) == torch.float32  # fits: widen once
    assert choose_load_dtype(cpu, 2 * gib, stored_16bit=True) == torch.bfloat16  # does not fit: keep bf16
    assert choose_load_dtype(cpu, 2 * gib, stored_16bit=False) == torch.float32  # fp32 on disk: never round
    int8 = choose_placement("cpu", quantize="int8", memory_budget_gib=64)
    assert choose_load_dtype(int8, gib, stored_16bit=True) == torch.bfloat16
    assert choose_load_dtype(choose_placement("cuda"), gib, stored_16bit=False) == torch.bfloat16


def test_the_cli_offers_every_quantization_the_engine_has() -> None:
    # cli_options lists --quantize's choices itself: importing precision would load torch for every command.
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    offered = [name for name in QUANTIZATIONS if name is not None]
    assert f"--quantize {{{','.join(offered)}}}" in parser.format_usage()  # these and no others
    assert [parser.parse_args(["--quantize", name]).quantize for name in offered] == offered
    assert parser.parse_args([]).quantize is None


@pytest.mark.parametrize(
    ("arguments", "param", "words"),
    [
        ({"device": "cpu", "dtype": "float8"}, "dtype", "unknown dtype 'float8'"),
        ({"device": "cpu", "dtype": "int8"}, "dtype", "unknown dtype 'int8'"),
        ({"device": "cuda", "quantize": "int8"}, "quantize", "CPU mode"),
        ({"device": "cuda:1", "quantize": "int8"}, "quantize", "CPU mode"),
        ({"device": "cpu", "quantize": "int4"}, "quantize", "unknown quantization 'int4'"),
        ({"device": "cpu", "quantize": "nf4"}, "quantize", "unknown quantization 'nf4'"),
    ],
)
def test_choose_placement_rejects(arguments: dict, param: str, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        choose_placement(**arguments)
    assert caught.value.param == param
    assert words in caught.value.message
    assert caught.value.status == 400
