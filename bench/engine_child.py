"""One configuration of the engine benchmark in a process of its own (bench/engine.py runs this as
`--role child`): load, warm up, wait for a quiet machine, generate the measured images, report a ChildResult
(module docstring of bench/engine.py: what is measured and how)."""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
STAGES = ("text_encoding", "reference_encoding", "denoising", "vae_decode")
RESULT_PREFIX = "BENCH_RESULT "

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
