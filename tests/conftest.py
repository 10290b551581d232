"""Shared fixtures: the tiny model is written once per session and loaded through the real loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Before any library import (huggingface_hub reads it once): tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import Flux2KleinPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from kleinserve.engine import Pipeline, load_pipeline  # noqa: E402
from kleinserve.engine.tiny import create_tiny  # noqa: E402
from kleinserve.jobs.record import JobParams  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def kleinserve_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kleinserve's cache (where `tiny-random` is written) lives in the test's temporary directory."""
    path = tmp_path_factory.mktemp("kleinserve-cache")
    os.environ["KLEINSERVE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The distilled tiny model in the diffusers layout (plus BFL single file)."""
    return create_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An undistilled (CFG) tiny model."""
    return create_tiny(tmp_path_factory.mktemp("models") / "tiny-base", seed=1, distilled=False)


@pytest.fixture(scope="session")
def pipeline(tiny_dir: Path) -> Pipeline:
    """Full precision (fp32 compute), the mode whose pixels match diffusers in fp32."""
    return load_pipeline(str(tiny_dir), dtype="float32")


@pytest.fixture(scope="session")
def reference_pipeline(tiny_dir: Path) -> Flux2KleinPipeline:
    """diffusers' own pipeline on the same files: the reference for pixel fidelity."""
    return Flux2KleinPipeline.from_pretrained(tiny_dir)


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic noise image of the given size."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def random_png_files(folder: Path, count: int, side: int, seed: int) -> list[Path]:
    """`count` distinct noise PNGs of side x side in `folder` (reference-0.png ...), seeds seed, seed + 1."""
    paths = []
    for index in range(count):
        path = folder / f"reference-{index}.png"
        random_image(side, side, seed=seed + index).save(path)
        paths.append(path)
    return paths


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def job_params(prompt: str = "a red circle", **fields: Any) -> JobParams:
    """A job's params as a 64x64, 2-step request of `prompt` resolves them; `fields` replace any."""
    resolved = {"width": 64, "height": 64, "steps": 2, "seed": 0, "max_sequence_length": 512}
    return JobParams(**{"prompt": prompt, **resolved, **fields})


def max_difference(a: Image.Image, b: Image.Image) -> int:
    """Largest per-channel difference in 1/255 units; images must have the same size."""
    assert a.size == b.size, (a.size, b.size)
    return int(np.abs(pixels(a) - pixels(b)).max())


def reference_image(
    reference: Flux2KleinPipeline,
    prompt: str,
    seed: int,
    width: int,
    height: int,
    steps: int,
    guidance: float = 1.0,
    images: list[Image.Image] | None = None,
) -> Image.Image:
    """diffusers' image for one seed, with a CPU generator, as the brief defines fidelity."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return reference(
        prompt=prompt,
        image=images,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
    ).images[0]


# --- S3-compatible storage: moto's server mode (tests/s3.py, imported only by the tests that use it) ---
from collections.abc import Iterator  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    from tests.s3 import S3Media


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of an S3 endpoint (moto on 127.0.0.1, a free port) for the whole session."""
    from tests.s3 import moto_server

    with moto_server() as url:
        yield url


@pytest.fixture
def s3_media_url(s3_endpoint: str) -> S3Media:
    """A fresh bucket: `.url` is `s3://<bucket>/<prefix>` (for --media-url), `.env` the variables a
    subprocess needs to reach it (endpoint, fake keys, region); unpacks as `url, env`."""
    from tests.s3 import new_bucket

    return new_bucket(s3_endpoint)


# --- PostgreSQL: a private server per session (tests/postgres.py, imported only by the tests that use it) ---
if TYPE_CHECKING:
    from tests.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL for the session (`make postgres-setup` installs it); `.kill()` and
    `.start_again()` crash and restart it on the same port."""
    from tests.postgres import PostgresServer

    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a database of this test's own, migrated (a copy of the session's template)."""
    return postgres_server.new_database()
