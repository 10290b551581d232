"""Prepared int8 weights (engine/prepared.py): written by the first int8 load or `kleinserve model prepare`,
read by the next, keyed by the weights' hashes, and rebuilt, never used, when stale or damaged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.engine.checkpoints import read_safetensors_metadata
from kleinserve.engine.int8 import Int8Linear
from kleinserve.types import GenerateRequest
from tests.conftest import max_difference

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor.*:UserWarning")
REQUEST = GenerateRequest(prompt="a lighthouse at dusk", width=64, height=64, seed=11)
TRANSFORMER_FILE = Path("transformer") / "diffusion_pytorch_model.safetensors"


def image(pipeline: Pipeline):
    return pipeline.generate(REQUEST).images[0].image


def prepared_files(model: Path) -> list[Path]:
    return sorted((model / ".kleinserve").glob("int8-*.safetensors"))


@pytest.fixture
def model(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "klein", ignore=shutil.ignore_patterns(".kleinserve")))


@pytest.fixture(scope="module")
def first_int8_image(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The int8 image of a load that quantized every weight (no prepared file existed)."""
    copy = shutil.copytree(tiny_dir, tmp_path_factory.mktemp("fresh") / "klein")
    pipeline = load_pipeline(str(copy), quantize="int8")
    assert pipeline.components.prepared_weights is not None
    return image(pipeline)


def test_first_load_writes_what_the_next_reads(model: Path, first_int8_image) -> None:
    first = load_pipeline(str(model), quantize="int8")
    (written,) = prepared_files(model)
    assert first.components.prepared_weights is not None
    assert first.components.prepared_weights.path == written and first.components.prepared_weights.written
    stored = load_file(str(written))
    # tiny: 1 double block (12 Linear), 2 single blocks (2 each), 27 Qwen3 layers (7 each); weight + scale.
    assert len(stored) == 2 * (12 + 2 * 2 + 27 * 7)
    assert stored["transformer.transformer_blocks.0.attn.to_q.weight"].dtype == torch.int8
    modified = written.stat().st_mtime_ns

    second = load_pipeline(str(model), quantize="int8")
    assert (
        prepared_files(model) == [written] and written.stat().st_mtime_ns == modified
    )  # read, not rewritten
    layer = second.components.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, Int8Linear)
    assert torch.equal(
        layer.weight_and_bias()[0].int_repr(), stored["transformer.transformer_blocks.0.attn.to_q.weight"]
    )
    assert max_difference(image(second), first_int8_image) == 0


def test_damaged_file_is_rebuilt_not_used(model: Path, first_int8_image) -> None:
    load_pipeline(str(model), quantize="int8")
    (written,) = prepared_files(model)
    data = bytearray(written.read_bytes())
    data[-2000] ^= 0x55  # a flipped int8 weight: the header and sizes are still fine
    written.write_bytes(bytes(data))

    rebuilt = load_pipeline(str(model), quantize="int8")
    assert max_difference(image(rebuilt), first_int8_image) == 0
    assert written.read_bytes() != bytes(data)  # written again, intact
    assert max_difference(image(load_pipeline(str(model), quantize="int8")), first_int8_image) == 0

    written.write_bytes(b"not a safetensors file")
    assert max_difference(image(load_pipeline(str(model), quantize="int8")), first_int8_image) == 0
    assert read_safetensors_metadata(written)["key"]


def test_new_weights_get_a_new_file(model: Path) -> None:
    load_pipeline(str(model), quantize="int8")
    (old,) = prepared_files(model)
    path = model / TRANSFORMER_FILE
    state = load_file(str(path))
    name = "transformer_blocks.0.attn.to_q.weight"
    state[name] = state[name] * 2
    save_file(state, str(path), metadata={"format": "pt"})

    changed = load_pipeline(str(model), quantize="int8")
    (new,) = prepared_files(model)
    assert new != old and not old.exists()
    key = json.loads(read_safetensors_metadata(new)["key"])
    assert set(key) == {"format", "torch", "cpu", "weights"} and key["torch"] == torch.__version__
    layer = changed.components.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, Int8Linear)
    assert torch.equal(
        layer.weight_and_bias()[0].int_repr(),
        load_file(str(new))[f"transformer.{name.removesuffix('.weight')}.weight"],
    )


def test_unwritable_model_directory_keeps_them_in_the_cache(
    model: Path, kleinserve_cache: Path, first_int8_image
) -> None:
    (model / ".kleinserve").write_text("a file where the folder would go")  # mkdir fails, even for root
    pipeline = load_pipeline(str(model), quantize="int8")
    prepared = pipeline.components.prepared_weights
    assert prepared is not None and prepared.written
    assert prepared.path.is_relative_to(kleinserve_cache / "prepared")
    again = load_pipeline(str(model), quantize="int8").components.prepared_weights
    assert again is not None and again.path == prepared.path and not again.written
    assert max_difference(image(pipeline), first_int8_image) == 0


def test_model_prepare_command(model: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kleinserve.cli", "model", "prepare", str(model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (written,) = prepared_files(model)
    assert str(written) in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "kleinserve.cli", "model", "prepare", str(model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "already prepared, and intact" in again.stdout, (
        again.stdout + again.stderr
    )


def test_another_cpu_or_torch_gets_its_own_file(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key holds the CPU's flags and torch's version: int8 weights prepared on one machine (or torch) are
    never read on another, whose file is written beside them."""
    load_pipeline(str(model), quantize="int8")
    (first,) = prepared_files(model)
    monkeypatch.setattr("kleinserve.engine.prepared.cpu_flags", lambda: {"avx2", "avx512_bf16"})
    other = load_pipeline(str(model), quantize="int8").components.prepared_weights
    assert other is not None and other.written and other.path != first
    assert not first.exists()  # one machine's file at a time: the other's is stale here
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    newer = load_pipeline(str(model), quantize="int8").components.prepared_weights
    assert newer is not None and newer.written and newer.path not in (first, other.path)
