"""`kleinserve toy train` is deterministic and writes a model the normal loader serves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kleinserve.cli import main
from kleinserve.engine import load_pipeline
from kleinserve.toy.train import TrainConfig, train
from kleinserve.types import GenerateRequest

# A few steps of each stage: enough to exercise every batch kind's code path, small enough for CI.
SHORT = TrainConfig(
    vae_small_steps=2,
    vae_full_steps=1,
    text_steps=3,
    text_batch=8,
    transformer_steps=6,
    decoder_steps=2,
    warmup_steps=2,
)


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_and_the_loader_serves_the_result(tmp_path: Path) -> None:
    first = train(tmp_path / "a", SHORT, log=lambda _: None)
    second = train(tmp_path / "b", SHORT, log=lambda _: None)
    other = train(tmp_path / "c", TrainConfig(**{**SHORT.__dict__, "seed": 1}), log=lambda _: None)
    assert _files(first) == _files(second)
    written = json.loads((first / "model_index.json").read_text())["_kleinserve_training"]
    assert written == dataclasses.asdict(SHORT)
    for weights in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _files(first)[weights] != _files(other)[weights]
    pipeline = load_pipeline(str(first), dtype="float32")
    assert pipeline.spec.name == "flux-2-klein-toy"
    image = pipeline.generate(GenerateRequest(prompt="a red circle", width=64, height=64, seed=0)).images[0]
    assert image.image.size == (64, 64)


def test_cli_eval_scores_a_model_and_reports_the_targets(tmp_path: Path, capsys) -> None:
    model = train(tmp_path / "toy", SHORT, log=lambda _: None)
    status = main(["toy", "eval", "--model", str(model), "--count", "2", "--edits", "2"])
    out = capsys.readouterr().out
    assert "colour" in out and ">= 90%" in out and "edit colour" in out
    assert status == 1  # six training steps draw nothing recognisable: the targets are not met
