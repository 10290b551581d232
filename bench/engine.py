"""Engine benchmark: images/s and peak RSS of kleinserve against stock diffusers, on the same weights.

    python bench/engine.py [--size tiny|4b|all] [--images N] [--resolution 256] [--keep]

Configurations, each measured in its own subprocess (so that peak RSS, `ru_maxrss`, is per configuration):
- `stock`: diffusers `Flux2KleinPipeline.from_pretrained(dir, torch_dtype=torch.bfloat16)` called as its docs
  show (`num_inference_steps=4, guidance_scale=1.0`, CPU generator);
- `kleinserve`: `kleinserve.engine.load_pipeline(dir)`, automatic placement (the engine picks compute dtype
  and weight storage; the report prints what it chose);
- `kleinserve-fp32`: `load_pipeline(dir, dtype="float32")`, full precision whatever the CPU;
- `kleinserve-int8`: `load_pipeline(dir, quantize="int8")`.

Model sizes:
- `tiny`: `kleinserve.engine.tiny.create_tiny` (8 measured images by default, after one warm-up image);
- `4b`: the real FLUX.2 [klein] 4B architecture (transformer, Qwen3-4B text encoder, FLUX.2 VAE) with random
  weights, built once on the meta device, filled deterministically in bf16 and saved in the diffusers layout
  to a cache directory (~16 GB, reused). One measured image per configuration, no warm-up; every measured
  image has a prompt of its own, so kleinserve's prompt-embedding cache never helps.

Reported per configuration: load seconds, seconds per image, images/s, images/s relative to stock, peak RSS,
stage timings (kleinserve's `GenerateResult.timings`; for stock, the forward time of the text encoder, of the
transformer and of `vae.decode`, measured with hooks) and the share of the CPU other processes took meanwhile
(2 threads on 2 cores: any other load skews the timings). Drift: PSNR of the int8 images against the
kleinserve-fp32 images (same prompt and seed), and, for information only, the largest pixel difference of
each kleinserve configuration from stock.

Rounds: every configuration runs once per round (`--rounds`, default 2), in alternating order (round 1 in
the order above, round 2 reversed, ...), and the report gives medians over the rounds (the largest peak RSS):
single runs drift by up to 2x on a shared 2-core machine. Whole-process seconds are the child's wall time,
from its start (Python and library imports included) to its exit: what a one-image `kleinserve generate`
costs.

Targets (4B, 256x256, 4 steps, 2 CPU threads; TARGETS): the automatic mode >= 1.2x stock images/s, peak RSS
<= 16 GiB, load <= 12 s; int8 >= 1.6x stock, peak RSS <= 11 GiB, load <= 20 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import cpu_line  # bench/machine.py (the script's folder is on sys.path)

if TYPE_CHECKING:
    import torch
    from PIL import Image

GIB = 1 << 30
THREADS = 2
STEPS = 4
# Configuration -> keyword arguments of kleinserve's load_pipeline ("stock" is diffusers).
KLEINSERVE_OPTIONS: dict[str, dict[str, str]] = {
    "kleinserve": {},  # automatic placement
    "kleinserve-fp32": {"dtype": "float32"},  # full precision, whatever the CPU supports
    "kleinserve-int8": {"quantize": "int8"},
}
CONFIGS = ("stock", *KLEINSERVE_OPTIONS)
STAGES = ("text_encoding", "reference_encoding", "denoising", "vae_decode")
# Issue 19's targets at 4B: (configuration, images/s vs stock >=, peak RSS GiB <=, load seconds <=).
TARGETS = (("kleinserve", 1.2, 16.0, 12.0), ("kleinserve-int8", 1.6, 11.0, 20.0))
RESULT_PREFIX = "BENCH_RESULT "
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "kleinserve-bench"

# Per size: (measured images, warm-up images) unless --images / --warmup say otherwise.
SIZE_DEFAULTS = {"tiny": (8, 1), "4b": (1, 0)}

WARMUP_PROMPT = "warm-up: a plain grey square"
PROMPTS = (
    "a red fox sleeping in fresh snow",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen on a wooden table, top view",
    "an astronaut riding a bicycle through Paris",
    "a watercolor map of an imaginary island",
    "a macro photo of a dew-covered spider web",
    "a cozy reading nook with a cat and a lamp",
    "a futuristic tram crossing a desert bridge",
    "a stack of pancakes with blueberries and syrup",
    "a koi pond in autumn, ukiyo-e style",
    "a neon sign that says OPEN in the rain",
    "a glass chess set on a marble floor",
    "a hot air balloon over lavender fields",
    "a knight made of origami paper",
    "a foggy pine forest at sunrise",
    "a vintage typewriter with a blank page",
)
BASE_SEED = 1000

# The klein-4B transformer (model.md section 2) and Qwen3-4B (model.md section 4).
KLEIN_4B_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
QWEN3_4B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)
RANDOM_4B_VERSION = "1"  # bump when build_random_klein_4b changes what it writes
COMPLETE_MARKER = ".kleinserve-bench-complete"
RANDOM_4B_DISK_BYTES = 17 * 10**9


# ----------------------------------------------------------------------------------------------------
# Models on disk


def prepare_tiny(work_dir: Path) -> Path:
    """A fresh tiny model (a second to write)."""
    directory = work_dir / "tiny-random"
    run_role(["--role", "build-tiny", "--model-dir", str(directory)])
    return directory


def prepare_random_4b(cache: Path) -> Path:
    """The random-weight klein-4B in the diffusers layout, built once (in a subprocess) and then reused."""
    directory = cache / "klein-4b-random"
    marker = directory / COMPLETE_MARKER
    if marker.exists() and marker.read_text().strip() == RANDOM_4B_VERSION:
        print(f"[bench] reusing {directory}", file=sys.stderr)
        return directory
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / "klein-4b-random.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    free = shutil.disk_usage(cache).free
    if free < RANDOM_4B_DISK_BYTES:
        raise SystemExit(f"{cache}: {free / 1e9:.1f} GB free, the random 4B model needs ~17 GB")
    print(f"[bench] building the random klein-4B in {directory} (once, a few minutes)", file=sys.stderr)
    start = time.perf_counter()
    run_role(["--role", "build-4b", "--model-dir", str(partial)])
    (partial / COMPLETE_MARKER).write_text(RANDOM_4B_VERSION + "\n")
    partial.rename(directory)
    print(f"[bench] built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return directory


def build_tiny(directory: Path) -> None:
    from kleinserve.engine.tiny import create_tiny

    shutil.rmtree(directory, ignore_errors=True)
    create_tiny(directory)


def build_random_klein_4b(directory: Path, seed: int = 0) -> None:
    """Build klein-4B on the meta device, materialise it in bf16, fill it deterministically and save it.

    Peak memory is the bf16 weights (~16 GB) plus one 2 GB shard being written.
    """
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kleinserve.engine.tiny import SCHEDULER_CONFIG, make_byte_tokenizer

    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**KLEIN_4B_TRANSFORMER)
        vae = AutoencoderKLFlux2()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
        module.to(torch.bfloat16).to_empty(device="cpu")
    text_encoder.tie_weights()  # to_empty gives every module its own tensor; restore the tied embeddings
    if text_encoder.lm_head.weight is not text_encoder.model.embed_tokens.weight:
        raise RuntimeError("lm_head and embed_tokens are not tied after tie_weights()")
    for module in (transformer, vae, text_encoder):
        fill_deterministically(module, generator)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_byte_tokenizer(),
        transformer=transformer,
        is_distilled=True,
    )
    pipeline.save_pretrained(directory, safe_serialization=True, max_shard_size="2GB")


def fill_deterministically(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Matrices and conv kernels ~ N(0, 1/fan_in) (activations stay finite), norm scales 1, biases 0,
    BatchNorm running statistics mean 0 / variance 1."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():  # tied parameters are listed once
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                raise ValueError(f"no fill rule for parameter {name} {tuple(param.shape)}")
        persistent = module.state_dict().keys()
        for name, buffer in module.named_buffers():
            if name not in persistent:
                continue  # recomputed at load time (e.g. rotary inv_freq)
            if name.endswith(("running_mean", "num_batches_tracked")):
                buffer.zero_()
            elif name.endswith("running_var"):
                buffer.fill_(1.0)
            else:
                raise ValueError(f"no fill rule for buffer {name} {tuple(buffer.shape)}")


# ----------------------------------------------------------------------------------------------------
# Child: one configuration, one process


@dataclass
class ChildResult:
    """What one configuration's process measured; `error` says why it produced nothing (e.g. killed)."""

    config: str
    load_seconds: float = math.nan
    image_seconds: list[float] = field(default_factory=list)
    stage_seconds: list[dict[str, float]] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    images: list[str] = field(default_factory=list)
    storage: dict[str, str] = field(default_factory=dict)
    other_cpu_fraction: float = math.nan  # CPU time of other processes while measuring, per core and second
    process_seconds: float = math.nan  # the child's wall time, start to exit (set by the parent)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.image_seconds)

    @property
    def seconds_per_image(self) -> float:
        return sum(self.image_seconds) / len(self.image_seconds) if self.image_seconds else math.nan

    @property
    def images_per_second(self) -> float:
        return 1.0 / self.seconds_per_image

    def mean_stage(self, stage: str) -> float | None:
        values = [s[stage] for s in self.stage_seconds if stage in s]
        return sum(values) / len(values) if values else None


GenerateFn = Callable[[str, int], "tuple[Image.Image, dict[str, float]]"]


def load_stock(model_dir: Path, resolution: int) -> GenerateFn:
    """diffusers as documented: bf16 weights, 4 steps, guidance 1.0, a CPU generator per image."""
    import torch
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    stages: dict[str, float] = {}
    time_forward(pipe.text_encoder, stages, "text_encoding")
    time_forward(pipe.transformer, stages, "denoising")
    pipe.vae.decode = timed_call(pipe.vae.decode, stages, "vae_decode")

    def generate(prompt: str, seed: int) -> tuple[Image.Image, dict[str, float]]:
        stages.clear()
        image = pipe(
            prompt=prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        return image, dict(stages)

    return generate


def time_forward(module: torch.nn.Module, stages: dict[str, float], stage: str) -> None:
    """Add the wall time of every forward of `module` to stages[stage]."""
    starts: list[float] = []
    module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

    def done(*_: object) -> None:
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - starts.pop()

    module.register_forward_hook(done)


def timed_call(function: Callable[..., Any], stages: dict[str, float], stage: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - start

    return wrapper


def load_kleinserve(
    model_dir: Path, resolution: int, options: dict[str, str]
) -> tuple[GenerateFn, dict[str, str]]:
    from kleinserve.engine import choose_placement, load_pipeline
    from kleinserve.types import GenerateRequest

    budget = choose_placement(**options).budget()  # what the loader sees, before the weights arrive
    pipeline = load_pipeline(str(model_dir), **options)

    def generate(prompt: str, seed: int) -> tuple[Image.Image, dict[str, float]]:
        request = GenerateRequest(prompt=prompt, width=resolution, height=resolution, steps=STEPS, seed=seed)
        result = pipeline.generate(request)
        return result.images[0].image, dict(result.timings)

    components = pipeline.components
    transformer = components.transformer
    storage = {
        "compute dtype": str(components.placement.dtype).removeprefix("torch."),
        "memory budget at load": f"{budget / GIB:.1f} GiB",
        "transformer blocks": describe_storage(
            [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        ),
        "text encoder layers": describe_storage(list(components.text_encoder.layers)),
    }
    return generate, storage


def describe_storage(blocks: list[torch.nn.Module]) -> str:
    """How repeated blocks hold their Linear weights, e.g. '18/25 PackedLinear bfloat16, 7/25 WidenedLinear
    bfloat16' (module class and weight dtype; any Linear-like module with in_features counts)."""
    from collections import Counter

    def linear_kind(module: torch.nn.Module) -> str | None:
        if not hasattr(module, "in_features"):
            return None
        name = type(module).__name__
        if name == "Int8Linear":
            return f"{name} int8"
        weight = getattr(module, "packed_weight", None)
        if weight is None:
            weight = getattr(module, "weight", None)
        dtype = str(getattr(weight, "dtype", "?")).removeprefix("torch.")
        return f"{name} {dtype}"

    def block_kind(block: torch.nn.Module) -> str:
        return " + ".join(sorted({kind for m in block.modules() if (kind := linear_kind(m))}))

    counts = Counter(block_kind(b) for b in blocks)
    return ", ".join(f"{n}/{len(blocks)} {kind}" for kind, n in counts.items())


def run_child(args: argparse.Namespace) -> ChildResult:
    import torch

    torch.set_num_threads(THREADS)
    model_dir = Path(args.model_dir)
    out_dir = Path(args.out_dir)
    storage: dict[str, str] = {}
    start = time.perf_counter()
    if args.config == "stock":
        generate = load_stock(model_dir, args.resolution)
    else:
        generate, storage = load_kleinserve(model_dir, args.resolution, KLEINSERVE_OPTIONS[args.config])
    load_seconds = time.perf_counter() - start
    log(f"{args.config}: loaded in {load_seconds:.1f} s")

    warmup_seconds = []
    for index in range(args.warmup):
        start = time.perf_counter()
        generate(f"{WARMUP_PROMPT} #{index}", BASE_SEED - 1 - index)
        warmup_seconds.append(time.perf_counter() - start)
        log(f"{args.config}: warm-up image {index} in {warmup_seconds[-1]:.1f} s")

    if (waited := wait_for_quiet(args.quiet_wait)) > 10:
        log(f"{args.config}: waited {waited:.0f} s for the other processes to go quiet")
    image_seconds, stage_seconds, paths = [], [], []
    meter = OtherCpuMeter()
    for index, (prompt, seed) in enumerate(measured(args.images)):
        start = time.perf_counter()
        image, stages = generate(prompt, seed)
        image_seconds.append(time.perf_counter() - start)
        stage_seconds.append(stages)
        path = out_dir / f"{args.size}-{args.config}-{index}.png"
        image.save(path)
        paths.append(str(path))
        log(f"{args.config}: image {index} in {image_seconds[-1]:.1f} s {format_stages(stages)}")
    return ChildResult(
        config=args.config,
        load_seconds=load_seconds,
        image_seconds=image_seconds,
        stage_seconds=stage_seconds,
        warmup_seconds=warmup_seconds,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        images=paths,
        storage=storage,
        other_cpu_fraction=meter.fraction(),
    )


class OtherCpuMeter:
    """How busy the other processes kept the machine since construction (Linux /proc/stat): timings are only
    comparable when this stays near 0, since 2 threads on 2 cores slow down badly when a core is shared."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), self._system_busy(), self._own_cpu())

    @staticmethod
    def _system_busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def fraction(self) -> float:
        wall, busy, own = self.start
        wall = time.perf_counter() - wall
        other = (self._system_busy() - busy) - (self._own_cpu() - own)
        return max(0.0, other) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def wait_for_quiet(limit: float, threshold: float = 0.10, window: float = 5.0) -> float:
    """Wait, at most `limit` seconds, until other processes use less than `threshold` of the machine over a
    `window` of seconds; returns the seconds waited."""
    start = time.perf_counter()
    while limit > 0:
        meter = OtherCpuMeter()
        time.sleep(window)
        if meter.fraction() < threshold or time.perf_counter() - start >= limit:
            break
    return time.perf_counter() - start


def measured(count: int) -> Iterator[tuple[str, int]]:
    """Distinct prompts (and seeds) for the measured images; never the warm-up prompt."""
    for index in range(count):
        prompt = PROMPTS[index % len(PROMPTS)]
        if index >= len(PROMPTS):
            prompt += f" #{index // len(PROMPTS)}"
        yield prompt, BASE_SEED + index


def format_stages(stages: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in stages.items())


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Parent: run the children, compare, print


class ChildFailed(Exception):
    pass


def run_role(extra: list[str]) -> str:
    """Run this script in a child process; its stderr passes through, its stdout is returned."""
    command = [sys.executable, str(Path(__file__).resolve()), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    code = completed.returncode
    if code < 0:
        hint = " (out of memory?)" if code == -signal.SIGKILL else ""
        raise ChildFailed(f"killed by {signal.Signals(-code).name}{hint}")
    if code != 0:
        raise ChildFailed(f"exit status {code}")
    return completed.stdout


def run_config(
    size: str,
    config: str,
    model_dir: Path,
    out_dir: Path,
    images: int,
    warmup: int,
    resolution: int,
    quiet_wait: float,
) -> ChildResult:
    log(f"--- {size} / {config}")
    options = {
        "--size": size,
        "--config": config,
        "--model-dir": str(model_dir),
        "--out-dir": str(out_dir),
        "--images": str(images),
        "--warmup": str(warmup),
        "--resolution": str(resolution),
        "--quiet-wait": str(quiet_wait),
    }
    start = time.perf_counter()
    try:
        stdout = run_role(["--role", "child", *(item for pair in options.items() for item in pair)])
    except ChildFailed as exc:
        log(f"{size}/{config} FAILED: {exc}")
        return ChildResult(config=config, error=str(exc))
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return ChildResult(config=config, error="the child printed no result")
    result = ChildResult(**json.loads(lines[-1].removeprefix(RESULT_PREFIX)))
    result.process_seconds = time.perf_counter() - start
    log(
        f"{size}/{config}: load {result.load_seconds:.1f} s, {result.seconds_per_image:.2f} s/image, "
        f"whole process {result.process_seconds:.1f} s, "
        f"peak RSS {result.peak_rss_bytes / GIB:.2f} GiB, other CPU {result.other_cpu_fraction:.0%}"
        + "".join(f", {k}: {v}" for k, v in result.storage.items())
    )
    return result


def pixels(path: str) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(a: str, b: str) -> float:
    mse = float(((pixels(a) - pixels(b)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def max_difference(a: str, b: str) -> int:
    return int(abs(pixels(a) - pixels(b)).max())


@dataclass
class SizeReport:
    size: str
    images: int
    warmup: int
    results: dict[str, ChildResult]

    def ratio(self, config: str) -> float:
        """images/s relative to stock; NaN when either failed or was not run."""
        if "stock" not in self.results:
            return math.nan
        return self.results[config].images_per_second / self.results["stock"].images_per_second

    def int8_psnr(self) -> float | None:
        """Lowest PSNR of an int8 image against the full-precision image of the same prompt and seed (forced
        fp32, or the automatic mode where it chose fp32 and fp32 was not run)."""
        automatic = self.results.get("kleinserve")
        reference = "kleinserve-fp32"
        fp32_automatic = automatic is not None and automatic.storage.get("compute dtype") == "float32"
        if reference not in self.results and fp32_automatic:
            reference = "kleinserve"
        return self._compare("kleinserve-int8", reference, psnr, min)

    def stock_difference(self, config: str) -> int | None:
        """Largest pixel difference from stock (bf16) over the images; information only."""
        return self._compare("stock", config, max_difference, max)

    def _compare(self, a: str, b: str, metric: Callable[[str, str], Any], combine: Callable[..., Any]) -> Any:
        first, second = self.results.get(a), self.results.get(b)
        if first is None or second is None or not (first.ok and second.ok):
            return None
        return combine(metric(x, y) for x, y in zip(first.images, second.images, strict=True))


TABLE_COLUMNS = (  # (title, width, alignment)
    ("size", 5, "<"),
    ("config", 16, "<"),
    ("load s", 7, ">"),
    ("s/image", 8, ">"),
    ("process s", 9, ">"),
    ("images/s", 9, ">"),
    ("vs stock", 8, ">"),
    ("peak RSS GiB", 12, ">"),
    ("text s", 7, ">"),
    ("ref s", 6, ">"),
    ("denoise s", 9, ">"),
    ("vae s", 6, ">"),
    ("other CPU", 9, ">"),
    ("drift", 1, "<"),
)


def table_line(cells: list[str]) -> str:
    return " ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, TABLE_COLUMNS, strict=True)).rstrip()


def table_row(report: SizeReport, config: str) -> list[str]:
    r = report.results[config]
    if not r.ok:
        return [report.size, config, *["-"] * (len(TABLE_COLUMNS) - 3), f"FAILED: {r.error}"]
    stages = [r.mean_stage(stage) for stage in STAGES]
    drift = ""
    if config == "kleinserve-int8":
        if (decibels := report.int8_psnr()) is not None:
            drift = f"PSNR vs fp32 = {decibels:.1f} dB (min)"
    elif config != "stock" and (difference := report.stock_difference(config)) is not None:
        drift = f"max |stock - this| = {difference}/255 (info)"
    return [
        report.size,
        config,
        f"{r.load_seconds:.1f}",
        f"{r.seconds_per_image:.2f}",
        f"{r.process_seconds:.1f}",
        f"{r.images_per_second:.4f}",
        times(report.ratio(config)),
        f"{r.peak_rss_bytes / GIB:.2f}",
        *(f"{s:.2f}" if s is not None else "-" for s in stages),
        f"{r.other_cpu_fraction:.0%}",
        drift,
    ]


def target_lines(report: SizeReport) -> list[str]:
    """One verdict per target of TARGETS (speed vs stock, peak RSS, load seconds)."""
    scope = "" if report.size == "4b" else " (informational: the targets are for the 4B size)"
    lines = [f"targets {report.size}{scope}:"]
    for config, speedup, rss_gib, load in TARGETS:
        if config not in report.results:
            continue
        r = report.results[config]
        ratio, rss = report.ratio(config), r.peak_rss_bytes / GIB
        lines.append(
            f"  {config} ({r.storage.get('compute dtype', '?')}): {times(ratio)} >= {speedup}x "
            f"{verdict(r.ok and ratio >= speedup)}, peak RSS {rss:.2f} <= {rss_gib:.0f} GiB "
            f"{verdict(r.ok and rss <= rss_gib)}, load {r.load_seconds:.1f} <= {load:.0f} s "
            f"{verdict(r.ok and r.load_seconds <= load)}" + ("" if r.ok else f" ({r.error})")
        )
    return lines


def median_result(rounds: list[ChildResult]) -> ChildResult:
    """One configuration over its rounds: median load, seconds per image and whole-process seconds, the
    largest peak RSS and other-CPU share; images, storage and stages of the successful rounds."""
    done = [r for r in rounds if r.ok]
    if not done:
        return rounds[0]
    return ChildResult(
        config=done[0].config,
        load_seconds=statistics.median(r.load_seconds for r in done),
        image_seconds=[statistics.median(r.seconds_per_image for r in done)],
        stage_seconds=[stage for r in done for stage in r.stage_seconds],
        warmup_seconds=[w for r in done for w in r.warmup_seconds],
        peak_rss_bytes=max(r.peak_rss_bytes for r in done),
        images=done[0].images,
        storage=done[0].storage,
        other_cpu_fraction=max(r.other_cpu_fraction for r in done),
        process_seconds=statistics.median(r.process_seconds for r in done),
    )


def print_report(reports: list[SizeReport], resolution: int, command: str) -> None:
    header = table_line([title for title, _, _ in TABLE_COLUMNS])
    print()
    print(f"FLUX.2 [klein] engine benchmark: {resolution}x{resolution}, {STEPS} steps, {THREADS} threads")
    print(f"machine: {cpu_line()}")
    print(header)
    print("-" * len(header))
    for report in reports:
        for config in report.results:
            print(table_line(table_row(report, config)))
    print()
    print(
        "stage columns: mean seconds per image (stock: forward time of text encoder, transformer, vae.decode)"
    )
    print("other CPU: share of the machine's cores that other processes used while the images were measured")
    for report in reports:
        print(
            f"{report.size}: {report.images} measured image(s) per configuration, "
            f"after {report.warmup} warm-up image(s)"
        )
        for config in [c for c in report.results if c != "stock"]:
            storage = report.results[config].storage
            if storage:
                print(f"  {config} storage: " + "; ".join(f"{k}: {v}" for k, v in storage.items()))
    print()
    for report in reports:
        print("\n".join(target_lines(report)))
    print()
    print(f"command: {command}")


def save_results(reports: list[SizeReport], path: Path) -> None:
    """Everything measured so far (kept with --keep), written after every configuration."""
    data = {r.size: {c: v.__dict__ for c, v in r.results.items()} for r in reports}
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_results(path: Path, images: int | None, warmup: int | None) -> list[SizeReport]:
    """The reports of a results.json a run kept (--keep), e.g. one cut short: what every configuration
    measured until then, medians over its rounds so far."""
    data = json.loads(path.read_text())
    return [
        SizeReport(
            size,
            images if images is not None else SIZE_DEFAULTS[size][0],
            warmup if warmup is not None else SIZE_DEFAULTS[size][1],
            {config: ChildResult(**fields) for config, fields in results.items()},
        )
        for size, results in data.items()
    ]


def times(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("tiny", "4b", "all"), default="all")
    parser.add_argument("--images", type=int, help="measured images per configuration (tiny 8, 4b 1)")
    parser.add_argument("--warmup", type=int, help="warm-up images per configuration (tiny 1, 4b 0)")
    parser.add_argument("--resolution", type=int, default=256, help="square output side in pixels")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the configurations (medians)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the random 4B is kept")
    parser.add_argument("--keep", action="store_true", help="keep the output images and results.json")
    parser.add_argument(
        "--report", type=Path, help="print the report of a kept results.json (a run cut short) and exit"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=300.0,
        help="before measuring, wait up to this many seconds for other processes to go quiet (0: never)",
    )
    # Internal: what the parent passes to its children.
    hidden = argparse.SUPPRESS
    parser.add_argument(
        "--role", choices=("main", "child", "build-tiny", "build-4b"), default="main", help=hidden
    )
    parser.add_argument("--config", choices=CONFIGS, help=hidden)
    parser.add_argument("--model-dir", help=hidden)
    parser.add_argument("--out-dir", help=hidden)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.role == "build-tiny":
        build_tiny(Path(args.model_dir))
        return
    if args.role == "build-4b":
        build_random_klein_4b(Path(args.model_dir))
        return
    if args.role == "child":
        result = run_child(args)
        print(RESULT_PREFIX + json.dumps(result.__dict__), flush=True)
        return

    command = shlex.join(sys.orig_argv)
    if args.report:
        print_report(load_results(args.report, args.images, args.warmup), args.resolution, command)
        return
    print(f"command: {command}", flush=True)
    sizes = ("tiny", "4b") if args.size == "all" else (args.size,)
    configs = [config for config in CONFIGS if config in args.configs.split(",")]
    work_dir = Path(tempfile.mkdtemp(prefix="kleinserve-bench-"))
    reports = []
    try:
        for size in sizes:
            images = args.images if args.images is not None else SIZE_DEFAULTS[size][0]
            warmup = args.warmup if args.warmup is not None else SIZE_DEFAULTS[size][1]
            model_dir = prepare_tiny(work_dir) if size == "tiny" else prepare_random_4b(args.cache_dir)
            report = SizeReport(size, images, warmup, {})
            reports.append(report)
            rounds: dict[str, list[ChildResult]] = {config: [] for config in configs}
            for index in range(args.rounds):
                out_dir = work_dir / f"round-{index}"
                out_dir.mkdir(exist_ok=True)
                for config in configs if index % 2 == 0 else configs[::-1]:
                    rounds[config].append(
                        run_config(
                            size, config, model_dir, out_dir, images, warmup, args.resolution, args.quiet_wait
                        )
                    )
                    report.results = {c: median_result(r) for c, r in rounds.items() if r}
                    save_results(reports, work_dir / "results.json")
        print_report(reports, args.resolution, command)
    finally:
        if args.keep:
            print(f"images and results.json kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
