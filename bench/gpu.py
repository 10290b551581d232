"""GPU benchmark: kleinserve's CUDA path (bf16, compiled, fp8) against stock diffusers on one GPU, at the real
klein-4B architecture with random weights built on the device (no download, no disk).

    python bench/gpu.py [--size 4b|tiny] [--device cuda] [--sides 1024,512] [--batches 1,4] [--rounds 3]
                        [--clients 8] [--configs ...] [--out gpu.json]

Meant to finish within 8 minutes on an H200 (`--budget`: configurations still to run when it is spent are
skipped and marked so). On a machine without network: `make gpu-wheels` here, then bench/gpu_setup.sh there
(README, GPU).

Configurations (CONFIGS), each built afresh from the same deterministic weights (bench/engine_models.py's
klein-4B shapes and fill: the same seed gives the same bf16 values on one device):
- `stock`: diffusers' `Flux2KleinPipeline` in bf16, called as its docs show (4 steps, guidance 1.0);
- `kleinserve`: kleinserve's engine in bf16 (`load_pipeline(..., device="cuda")` places modules the same way);
- `kleinserve-compiled`: with `--compile` (engine/compiled.py: each transformer block compiled, fullgraph);
- `kleinserve-fp8`, `kleinserve-fp8-compiled`: with `--quantize fp8` (engine/fp8.py), eager and compiled.

Per configuration, side and batch: one warm-up call (compilation included: reported as warm-up seconds, kept
out of the timed figures), then `--rounds` timed calls, each with prompts never seen before (no prompt-cache
hits); medians are reported. Stage times come from hooks on the components with `torch.cuda.synchronize()`
at every stage boundary on CUDA: text encoding (the text encoder's forward), each denoising step (one
transformer call each), VAE decode, and PNG encoding of the batch's images (PIL, as the server encodes them).
Peak memory is `torch.cuda.max_memory_allocated`, reset per (configuration, side, batch) (on the CPU: the
process's peak RSS).

Checks (each side, batch 1, one prompt and seed for every configuration): kleinserve bf16 against stock bf16
(largest pixel difference), bounded by diffusers' own drift, stock bf16 against diffusers in fp32 on the same
device; compiled against eager (largest difference); fp8 as PSNR against kleinserve bf16 and diffusers fp32.

Server: the `--serve-config` pipeline behind the real HTTP app (kleinserve's `create_app` under uvicorn on a
loopback port, in this process), `--clients` concurrent OpenAI clients sending `--requests` requests each at
the first side, after one request per client as warm-up (and, for a compiled pipeline, one call of each batch
size up to `--serve-max-batch` beforehand): images/s and p50/p95 latency.

Prints the device and versions first, a markdown table last, and writes everything to `--out` as JSON (default
$OUT/gpu.json when $OUT is set), after every configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpu_models import SHAPES, build_modules, kleinserve_pipeline, stock_pipeline  # bench/gpu_models.py
from gpu_report import check_report, environment, markdown  # bench/gpu_report.py
from gpu_server import serve_and_measure  # bench/gpu_server.py
from images import pixels  # bench/images.py

if TYPE_CHECKING:
    import torch

STEPS = 4
BASE_SEED = 2000
CHECK_PROMPT = "a red fox sleeping in fresh snow, golden hour"
CHECK_SEED = 7
# name -> (library, options): kleinserve's are load_pipeline's precision options.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "stock": ("diffusers", {}),
    "kleinserve": ("kleinserve", {}),
    "kleinserve-compiled": ("kleinserve", {"compile": True}),
    "kleinserve-fp8-compiled": ("kleinserve", {"quantize": "fp8", "compile": True}),
    "kleinserve-fp8": ("kleinserve", {"quantize": "fp8"}),  # last: the first one a short budget drops
}


class Stages:
    """Stage seconds of one call, from hooks on the components; on CUDA every boundary synchronises."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.text = 0.0
        self.steps: list[float] = []
        self.vae = 0.0

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset(self) -> None:
        self.text, self.steps, self.vae = 0.0, [], 0.0

    def attach(self, text_encoder: Any, transformer: Any, vae: Any) -> None:
        self._time_forward(text_encoder, "text")
        self._time_forward(transformer, "step")
        decode = vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            out = decode(*args, **kwargs)
            self.sync()
            self.vae += time.perf_counter() - start
            return out

        vae.decode = timed_decode

    def _time_forward(self, module: Any, stage: str) -> None:
        starts: list[float] = []

        def before(*_: Any) -> None:
            self.sync()
            starts.append(time.perf_counter())

        def after(*_: Any) -> None:
            self.sync()
            seconds = time.perf_counter() - starts.pop()
            if stage == "text":
                self.text += seconds
            else:
                self.steps.append(seconds)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


class Generator:
    """One configuration's pipeline as `(prompts, seeds, side) -> PIL images`, with its stage hooks."""

    def __init__(self, library: str, pipe: Any, device: torch.device) -> None:
        self.library, self.pipe = library, pipe
        self.stages = Stages(device)
        if library == "diffusers":
            self.stages.attach(pipe.text_encoder, pipe.transformer, pipe.vae)
        else:
            c = pipe.components
            self.stages.attach(c.text_encoder, c.transformer, c.vae)

    def __call__(self, prompts: list[str], seeds: list[int], side: int) -> list[Any]:
        import torch

        if self.library == "diffusers":
            return list(
                self.pipe(
                    prompt=prompts,
                    height=side,
                    width=side,
                    num_inference_steps=STEPS,
                    guidance_scale=1.0,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                ).images
            )
        from kleinserve.types import GenerateRequest

        resolved = [
            self.pipe.resolve(GenerateRequest(prompt=p, width=side, height=side, steps=STEPS, seed=s))
            for p, s in zip(prompts, seeds, strict=True)
        ]
        return [result.images[0].image for result in self.pipe.generate_batch(resolved)]


def timed_call(generate: Generator, prompts: list[str], seeds: list[int], side: int) -> dict[str, Any]:
    """One synchronised call and the PNG encoding of its images: seconds per stage."""
    import io

    generate.stages.reset()
    generate.stages.sync()
    start = time.perf_counter()
    images = generate(prompts, seeds, side)
    generate.stages.sync()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        image.save(io.BytesIO(), format="PNG")
    png = time.perf_counter() - start
    s = generate.stages
    return {"seconds": seconds, "text": s.text, "steps": list(s.steps), "vae": s.vae, "png": png}


def median_call(calls: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(c[key] for c in calls)

    steps = [
        statistics.median(c["steps"][i] for c in calls) for i in range(min(len(c["steps"]) for c in calls))
    ]
    return {
        "seconds": med("seconds"),
        "text": med("text"),
        "steps": steps,
        "vae": med("vae"),
        "png": med("png"),
    }


class Prompts:
    """Prompts never given before in this process (kleinserve's prompt cache never hits)."""

    def __init__(self) -> None:
        self.count = 0

    def take(self, n: int) -> tuple[list[str], list[int]]:
        first, self.count = self.count, self.count + n
        return [f"a lighthouse on a cliff at dusk, study {i}" for i in range(first, first + n)], [
            BASE_SEED + i for i in range(first, first + n)
        ]


def peak_memory(device: torch.device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_config(
    name: str, args: argparse.Namespace, device: torch.device, prompts: Prompts, checks: dict[int, dict]
) -> dict[str, Any]:
    """Build, check and time one configuration (and serve it when it is `--serve-config`)."""
    import torch

    library, options = CONFIGS[name]
    result: dict[str, Any] = {"library": library, "options": options, "runs": {}}
    reset_peak(device)
    start = time.perf_counter()
    modules = build_modules(args.size, device, torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    pipe = (
        stock_pipeline(modules)
        if library == "diffusers"
        else kleinserve_pipeline(modules, device, args.dtype, options)
    )
    del modules
    result["build_seconds"] = time.perf_counter() - start
    generate = Generator(library, pipe, device)
    for side in args.sides:
        for batch in args.batches:
            reset_peak(device)
            start = time.perf_counter()
            timed_call(generate, *prompts.take(batch), side)  # warm-up: compilation, allocator, kernels
            warmup = time.perf_counter() - start
            calls = [timed_call(generate, *prompts.take(batch), side) for _ in range(args.rounds)]
            run = median_call(calls)
            run.update(
                warmup_seconds=warmup,
                images_per_second=batch / run["seconds"],
                peak_memory_bytes=peak_memory(device),
                rounds=len(calls),
            )
            result["runs"][f"{side}x{batch}"] = run
            log(f"{name} {side}px batch {batch}: {run['seconds']:.3f} s (warm-up {warmup:.1f} s)")
        # After the warm-ups: a compiled pipeline's first call of a shape (compilation) is timed there.
        image = generate([CHECK_PROMPT], [CHECK_SEED], side)[0]
        checks.setdefault(side, {})[name] = pixels(image)
    if name == args.serve_config:
        result["server"] = serve_and_measure(pipe, args, device, generate.stages.sync)
    return result


def free_device(device: torch.device) -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()  # each configuration's compilation is its own (and timed as its own warm-up)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_images(args: argparse.Namespace, device: torch.device, checks: dict[int, dict]) -> None:
    """diffusers in fp32 on the same weights: the bound of bf16's drift."""
    import torch

    pipe = stock_pipeline(build_modules(args.size, device, torch.float32))
    generate = Generator("diffusers", pipe, device)
    for side in args.sides:
        checks.setdefault(side, {})["diffusers-fp32"] = pixels(
            generate([CHECK_PROMPT], [CHECK_SEED], side)[0]
        )


def log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--size", choices=tuple(SHAPES), default="4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    parser.add_argument("--sides", type=ints, default=[1024, 512], help="square sides, e.g. 1024,512")
    parser.add_argument("--batches", type=ints, default=[1, 4], help="images per call, e.g. 1,4")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per side and batch (medians)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    parser.add_argument("--no-reference", action="store_true", help="skip diffusers fp32 (the drift bound)")
    parser.add_argument(
        "--serve-config", default="kleinserve-compiled", help="configuration served ('' none)"
    )
    parser.add_argument("--serve-max-batch", type=int, default=4, help="the server's --max-batch")
    parser.add_argument("--serve-side", type=int, help="square side served (default: the first of --sides)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds; later configurations are skipped"
    )
    out = os.environ.get("OUT")
    parser.add_argument(
        "--out", type=Path, default=Path(out) / "gpu.json" if out else None, help="results JSON"
    )
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "environment": environment(device),
        "args": vars(args) | {"out": str(args.out)},
    }
    results |= {"configs": {}, "checks": {}}
    print("\n".join(f"{k}: {v}" for k, v in results["environment"].items()), flush=True)
    checks: dict[int, dict] = {}
    prompts = Prompts()
    if not args.no_reference:
        reference_images(args, device, checks)
        free_device(device)
    for name in args.configs:
        if time.perf_counter() - started > args.budget:
            results["configs"][name] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            continue
        log(f"--- {name}")
        try:
            results["configs"][name] = run_config(name, args, device, prompts, checks)
        except Exception as exc:  # one configuration failing (e.g. a compile error) must not lose the others
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            results["configs"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        free_device(device)
        results["checks"] = check_report(checks)
        results["seconds"] = time.perf_counter() - started
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    print(table, flush=True)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(table + "\n")
    print(f"total {time.perf_counter() - started:.0f} s; command: {' '.join(sys.orig_argv)}", flush=True)
    return 1 if any("error" in c for c in results["configs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
