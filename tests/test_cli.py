"""The `kleinserve` command, run for real as a subprocess (`python -m kleinserve.cli`).

Each run pays ~5 s of imports (torch, diffusers, transformers), so the module fixture starts every command
at once in a thread pool and each test waits only for its own: on 2 cores the module takes about half the
time of running them one after the other.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kleinserve.engine import Pipeline, load_pipeline
from kleinserve.types import GenerateRequest, ImageFormat
from tests.conftest import max_difference, random_image

TIMEOUT_SECONDS = 300
NO_SUCH_REPO = "kleinserve-test/no-such-model"  # a repo id in no cache; the runs are offline


@dataclass(frozen=True)
class Run:
    cwd: Path
    returncode: int
    stdout: str
    stderr: str


def run_commands(cwd: Path, commands: list[list[str]], env: dict[str, str]) -> Run:
    """Run the commands one after the other in `cwd`; stop at the first failure."""
    cwd.mkdir(parents=True, exist_ok=True)
    stdout, stderr = [], []
    returncode = 0
    for arguments in commands:
        done = subprocess.run(
            [sys.executable, "-m", "kleinserve.cli", *arguments],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
        stdout.append(done.stdout)
        stderr.append(done.stderr)
        returncode = done.returncode
        if returncode != 0:
            break
    return Run(cwd, returncode, "".join(stdout), "".join(stderr))


class Runs:
    """Scenario name -> its Run, waiting for that scenario only."""

    def __init__(self, futures: dict[str, Future[Run]]) -> None:
        self._futures = futures

    def __getitem__(self, name: str) -> Run:
        return self._futures[name].result()


@pytest.fixture(scope="module")
def cli(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    work = tmp_path_factory.mktemp("cli")
    random_image(100, 70, seed=4).save(work / "ref.png")
    (work / "broken.png").write_bytes(b"this is not an image\n")
    model = ["--model", str(tiny_dir)]
    fp32 = ["--dtype", "float32"]  # the session `pipeline` computes in fp32; the CPU default may be bf16
    scenarios = {
        "png": [["generate", "a fox", *model, *fp32, "--size", "64x64", "--seed", "3", "-o", "out.png"]],
        "webp": [
            ["generate", "a fox", *model, "--size", "64x64", "--seed", "3", "--n", "2", "-o", "out.webp"]
        ],
        "ref": [["generate", "make it blue", *model, *fp32, "--ref", str(work / "ref.png"), "--seed", "5"]],
        "bad_model": [["generate", "a fox", "--model", str(work / "no-such-model"), "--size", "64x64"]],
        "bad_size": [["generate", "a fox", *model, "--size", "32x32", "--seed", "1"]],
        "bad_ref": [["generate", "a fox", *model, "--ref", str(work / "broken.png"), "--size", "64x64"]],
        "default_model": [["generate", "a red circle on a white background", "--seed", "1", "-o", "toy.png"]],
        "cuda": [["generate", "a fox", *model, "--device", "cuda", "--size", "64x64"]],
        "fp16": [["generate", "a fox", *model, "--dtype", "float16", "--size", "64x64"]],
        "bad_device": [["generate", "a fox", *model, "--device", "gpu", "--size", "64x64"]],
        "help": [["generate", "--help"]],
        "info_repo": [["model", "info", NO_SUCH_REPO]],
        "info_repo_download": [["model", "info", NO_SUCH_REPO, "--download"]],
        "info_toy": [["model", "info", "flux-2-klein-toy"]],
        "tiny": [["model", "create-tiny", "made"], ["model", "info", "made"]],
        "tiny_base": [["model", "create-tiny", "made", "--base"], ["model", "info", "made"]],
    }
    env = {**os.environ, "KLEINSERVE_CACHE": str(work / "kleinserve-cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("KLEINSERVE_MODEL", None)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        yield Runs({name: pool.submit(run_commands, work / name, c, env) for name, c in scenarios.items()})


def assert_ok(run: Run) -> None:
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr


def assert_one_line_error(run: Run, *fragments: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("kleinserve: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert run.stdout == ""
    assert not list(run.cwd.iterdir())  # nothing written


# --- generate ---------------------------------------------------------------------------------------------


def test_generate_without_model_uses_the_embedded_toy_at_its_default_size(cli: Runs) -> None:
    run = cli["default_model"]
    assert_ok(run)
    assert run.stdout.splitlines() == ["toy.png\tseed=1\t256x256"]


def test_generate_png(cli: Runs, pipeline: Pipeline) -> None:
    run = cli["png"]
    assert_ok(run)
    assert run.stdout.splitlines() == ["out.png\tseed=3\t64x64"]
    expected = pipeline.generate(GenerateRequest(prompt="a fox", width=64, height=64, seed=3))
    with Image.open(run.cwd / "out.png") as written:
        assert (written.format, written.size, written.mode) == ("PNG", (64, 64), "RGB")
        assert max_difference(written, expected.images[0].image) == 0


def test_generate_two_webp_images(cli: Runs, tiny_dir: Path) -> None:
    """Also the CLI's automatic device and dtype: the same as the engine's."""
    run = cli["webp"]
    assert_ok(run)
    assert run.stdout.splitlines() == ["out-0.webp\tseed=3\t64x64", "out-1.webp\tseed=4\t64x64"]
    assert sorted(p.name for p in run.cwd.iterdir()) == ["out-0.webp", "out-1.webp"]
    default = load_pipeline(str(tiny_dir))
    expected = default.generate(GenerateRequest(prompt="a fox", width=64, height=64, seed=3, num_images=2))
    for index, image in enumerate(expected.images):
        path = run.cwd / f"out-{index}.webp"
        with Image.open(path) as written:
            assert (written.format, written.size) == ("WEBP", (64, 64))
        # The same pixels encoded with the same settings: the same bytes.
        assert path.read_bytes() == image.encode(ImageFormat.WEBP), path.name


def test_generate_size_follows_reference(cli: Runs, pipeline: Pipeline) -> None:
    run = cli["ref"]
    assert_ok(run)
    # 100x70 is centre-cropped to multiples of 16; without --size the output takes that size.
    assert run.stdout.splitlines() == ["kleinserve.png\tseed=5\t96x64"]
    with Image.open(run.cwd.parent / "ref.png") as reference:
        expected = pipeline.generate(
            GenerateRequest(prompt="make it blue", seed=5, reference_images=(reference,))
        )
    with Image.open(run.cwd / "kleinserve.png") as written:
        assert written.size == (96, 64)
        assert max_difference(written, expected.images[0].image) == 0


# --- errors: exit 2, one line, no traceback ---------------------------------------------------------------


def test_bad_model_path(cli: Runs) -> None:
    run = cli["bad_model"]
    assert_one_line_error(run, str(run.cwd.parent / "no-such-model"), "no such file or directory")


def test_size_out_of_range(cli: Runs) -> None:
    assert_one_line_error(cli["bad_size"], "width 32 is out of range", "64-2048")


def test_unreadable_reference(cli: Runs) -> None:
    run = cli["bad_ref"]
    assert_one_line_error(run, str(run.cwd.parent / "broken.png"), "not a readable image")


def test_cuda_device_without_cuda(cli: Runs) -> None:
    run = cli["cuda"]
    if torch.cuda.is_available():
        assert_ok(run)
    else:  # refused before any weight is read, not torch's "Torch not compiled with CUDA enabled" traceback
        assert_one_line_error(run, "device cuda is not available", "allowed: cpu")


def test_float16_runs_whatever_the_cpu(cli: Runs) -> None:
    """oneDNN packs float16 weights only on CPUs with AVX512_FP16 or AVX_NE_CONVERT; elsewhere loading ended
    in torch's RuntimeError from mkldnn_reorder_linear_weight (exit 1). Now such a CPU computes unpacked."""
    run = cli["fp16"]
    assert_ok(run)
    assert "seed" in run.stdout


def test_unknown_device(cli: Runs) -> None:
    assert_one_line_error(cli["bad_device"], "unknown device 'gpu'", "cpu, cuda, cuda:N")


def test_generate_help_says_the_default_size_follows_the_model(cli: Runs) -> None:
    run = cli["help"]
    assert_ok(run)
    text = " ".join(run.stdout.split())  # argparse wraps the help at the terminal's width
    assert "else the model's own square: 1024x1024 for klein, 256x256 for the toy" in text


# --- model create-tiny / info -----------------------------------------------------------------------------


def test_info_on_a_repo_id_suggests_download_which_it_takes(cli: Runs) -> None:
    assert_one_line_error(cli["info_repo"], NO_SUCH_REPO, "not in the local Hugging Face cache", "--download")
    # accepted (not argparse's "unrecognized arguments"); offline, the download itself fails
    assert_one_line_error(cli["info_repo_download"], NO_SUCH_REPO, "not in the local Hugging Face cache")


def test_info_shows_the_default_size(cli: Runs) -> None:
    run = cli["info_toy"]
    assert_ok(run)
    assert info_lines(run.stdout)["default size"] == "256x256"


def info_lines(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def values_in(path: Path, layers_below: int | None = None) -> int:
    """Values stored in a safetensors file; with `layers_below`, only embeddings and layers 0..N-1."""

    def kept(key: str) -> bool:
        if layers_below is None:
            return True
        if ".layers." in key:
            return int(key.split(".layers.")[1].split(".")[0]) < layers_below
        return "embed_tokens" in key

    return sum(t.numel() for key, t in load_file(str(path)).items() if kept(key))


def test_create_tiny_then_info(cli: Runs, tiny_dir: Path) -> None:
    run = cli["tiny"]
    assert_ok(run)
    made = run.cwd / "made"
    assert run.stdout.splitlines()[0] == "made"  # create-tiny prints the directory it wrote
    # Same default seed as the session's tiny model: the same weights, byte for byte.
    for relative in ("transformer/diffusion_pytorch_model.safetensors", "flux-2-klein-tiny.safetensors"):
        assert (made / relative).read_bytes() == (tiny_dir / relative).read_bytes(), relative
    info = info_lines(run.stdout)
    assert info["variant"] == "tiny-random"
    assert info["distilled"] == "True"
    assert info["default steps"] == "4"
    assert info["default guidance"] == "1.0"
    assert info["default size"] == "1024x1024"
    assert info["stored dtypes"] == "transformer F32, text_encoder F32, vae F32"
    transformer = values_in(made / "transformer" / "diffusion_pytorch_model.safetensors")
    text_encoder = values_in(made / "text_encoder" / "model.safetensors", layers_below=27)
    vae = values_in(made / "vae" / "diffusion_pytorch_model.safetensors")
    assert info["transformer parameters"] == f"{transformer:,}"
    assert info["text encoder parameters (layers used)"] == f"{text_encoder:,}"
    assert info["vae parameters"] == f"{vae:,}"


def test_create_tiny_base_then_info(cli: Runs) -> None:
    run = cli["tiny_base"]
    assert_ok(run)
    info = info_lines(run.stdout)
    assert info["variant"] == "tiny-random-base"
    assert info["distilled"] == "False"
    assert info["default steps"] == "50"
    assert info["default guidance"] == "4.0"


# --- serve --------------------------------------------------------------------------------------------------


def serve_command(tiny_dir: Path, data_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "kleinserve.cli", "serve", "--model", str(tiny_dir), "--dtype", "float32",
            "--port", str(port), "--data-dir", str(data_dir)]  # fmt: skip


def test_serve_on_a_busy_port_fails_before_loading(tiny_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            serve_command(tiny_dir, tmp_path / "data", port),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
    run = Run(tmp_path, done.returncode, done.stdout, done.stderr)
    assert_one_line_error(run, f"port {port} on 127.0.0.1 is in use")  # and no "serving ..." on stdout


def test_serve_says_serving_once_it_listens(tiny_dir: Path, tmp_path: Path) -> None:
    """A script may connect as soon as it reads the line (it used to be printed before uvicorn bound)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = serve_command(tiny_dir, tmp_path / "data", port)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as server:
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # ConnectionRefusedError if nothing listens yet
            assert line == f"kleinserve: serving tiny-random at http://127.0.0.1:{port}/\n"
        finally:
            server.terminate()
            server.wait(timeout=60)
