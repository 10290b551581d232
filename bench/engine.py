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

Targets (4B, 256x256, 4 steps, 2 CPU threads; engine_report.TARGETS): the automatic mode >= 1.2x stock
images/s, peak RSS <= 16 GiB, load <= 12 s; int8 >= 1.6x stock, peak RSS <= 11 GiB, load <= 20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/engine_child.py, bench/engine_models.py, bench/machine.py (the script's folder is on sys.path)
from engine_child import (
    GIB,
    KLEINSERVE_OPTIONS,
    RESULT_PREFIX,
    THREADS,
    ChildResult,
    log,
    run_child,
)
from engine_models import RANDOM_4B_VERSION, build_random_klein_4b, build_tiny
from engine_report import SizeReport, median_result, print_report

CONFIGS = ("stock", *KLEINSERVE_OPTIONS)
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "kleinserve-bench"

# Per size: (measured images, warm-up images) unless --images / --warmup say otherwise.
SIZE_DEFAULTS = {"tiny": (8, 1), "4b": (1, 0)}
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
        build_random_klein_4b(Path(args.model_dir), THREADS)
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
