"""LoRA benchmark (issue 17, item 6): adapters per request, batched across adapters, against diffusers.

    python bench/lora.py [--size tiny|4b] [--blocks D,S] [--rounds N] [--dtype float32|bfloat16]

256x256, 4 steps, 2 threads, the same dtype on both sides (fp32 by default). Adapters: random, rank 16 and
rank 64, on every attention and MLP projection of the blocks, written as diffusers-format files with the
real key names (kleinserve.engine.tiny_lora), read from disk by both sides. Configurations:
- `batch rR`: kleinserve, ONE batch of 4 requests, each with its own adapter (4 different adapters);
- `diffusers rR`: the same 4 requests one by one the diffusers way, each timed whole: read the file and
  `load_lora_weights(adapter_name=...)`, `set_adapters([name], [1.0])`, generate, `unload_lora_weights()`;
- `one rR`: kleinserve, one request with one adapter (batch 1);
- `none after`: kleinserve, one request without adapters on a model whose layers an adapter request wrapped;
- `none before`: kleinserve, the same request on a model loaded without adapters (nothing wrapped);
- `diffusers none`: diffusers, the same request without adapters (how the two bases compare, information).
Each round runs every configuration once, in an order rotated from round to round; figures are medians over
the rounds, in seconds per image. kleinserve's adapters come from its cache: a server reads an adapter once,
on its first use, here before the measured rounds (4b: at set-up; tiny: in the warm-up round). Also printed:
diffusers' switching time per request, how far kleinserve's batch outputs are from diffusers' one-by-one
outputs (both sides do the same work), the other processes' share of the cores and the peak RSS.

Sizes:
- `tiny`: whole pipelines of the tiny model (kleinserve.engine.tiny): `load_pipeline(dir, dtype=...,
  lora_dir=...)` against `Flux2KleinPipeline.from_pretrained`. Each round's requests have prompts of their
  own, so kleinserve's prompt-embedding cache never helps it against diffusers in (a).
- `4b`: the transformer only (at 4B a whole image costs ~4 min on 2 cores): diffusers'
  `Flux2Transformer2DModel` at the real klein-4B widths with `--blocks D,S` of its 5 double and 20 single
  blocks, random weights, one forward at 256x256 (256 image + 512 text tokens, random prompt embeddings of
  the real width). kleinserve's side is a copy with its Linear layers placed as the engine places them
  (`precision.Placer`) and wrapped by `lora_layers.wrap_layers`, its rows routed by `plan_rows`;
  diffusers' side is the plain module with `load_lora_adapter` / `set_adapters` / `unload_lora`. Each request
  runs ONE forward, counted 4 times (the 4 steps are identical forwards), plus its adapter switching once.
  The blocks of each kind are identical, so per-block costs and ratios carry over to the full model; the
  embedders and modulation layers are counted once whatever D and S.

Targets (4B): (a) batch >= 1.5x diffusers images/s; (b) `one r16` <= 15 % over `none after`;
(c) `none after` within 3 % of `none before`.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from engine_child import GIB, STEPS, THREADS, OtherCpuMeter, log, wait_for_quiet  # bench/engine_child.py
from engine_report import verdict  # bench/engine_report.py
from lora_sides import RANKS, REQUESTS, RESOLUTION, Bench, TinyBench, TransformerBench
from machine import cpu_line

TARGET_BATCH = 1.5
TARGET_ONE_ADAPTER = 0.15
TARGET_NO_ADAPTER = 0.03
DISTURBED = 0.10  # other processes' share of the cores above which timings are suspect
DEFAULTS = {"tiny": {"rounds": 9, "warmup": 1}, "4b": {"rounds": 3, "warmup": 0}}


def measure(bench: Bench, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Every configuration once per round, in an order rotated by one each round; the first `warmup` rounds
    are run and dropped. Returns each configuration's seconds per image, one value per measured round."""
    configs = bench.configs()
    names = list(configs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        if index == warmup:
            for switches in bench.switch_seconds.values():
                switches.clear()
        bench.round = index
        shift = index % len(names)
        this_round = {name: configs[name]() for name in names[shift:] + names[:shift]}
        if index >= warmup:
            for name, value in this_round.items():
                seconds[name].append(value)
        kind = "warm-up round" if index < warmup else f"round {index - warmup + 1}/{rounds}"
        log(f"{kind}: " + ", ".join(f"{name} {this_round[name]:.3f}" for name in names))
    return seconds


def change(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.1f} %"


def report(args: argparse.Namespace, bench: Bench, seconds: dict[str, list[float]], others: float) -> None:
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print()
    if args.size == "4b":
        double, single = args.blocks
        scope = (
            f"klein-4B transformer only, {double} of 5 double + {single} of 20 single blocks (identical "
            f"blocks: per-block ratios carry over), random weights; 1 forward per request counted {STEPS} "
            "times + adapter switching once"
        )
    else:
        scope = "tiny model, whole pipelines"
    print(f"LoRA benchmark (issue 17): {scope}")
    print(
        f"{RESOLUTION}x{RESOLUTION}, {STEPS} steps, {THREADS} threads, {args.dtype}, ranks {RANKS}, "
        f"{REQUESTS} requests per batch; medians of {args.rounds} rounds (after {args.warmup} warm-up)"
    )
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"machine: {cpu_line()}")
    header = f"{'config':<16} {'s/image':>9} {'images/s':>9} {'min s':>9} {'max s':>9}"
    print(header)
    print("-" * len(header))
    for name, values in seconds.items():
        cells = (median[name], 1 / median[name], min(values), max(values))
        print(f"{name:<16} " + " ".join(f"{cell:>9.3f}" for cell in cells))
    for rank, switches in bench.switch_seconds.items():
        print(
            f"diffusers r{rank}: load + set + unload per request, median {statistics.median(switches):.3f} s"
        )
    if isinstance(bench, TransformerBench):
        print(f"kleinserve: first use of an adapter (read, check, wrap) {bench.first_use_seconds:.3f} s")
    print(
        f"base alone, no adapters: kleinserve {median['none before']:.3f} s/image, diffusers "
        f"{median['diffusers none']:.3f} s/image ({median['diffusers none'] / median['none before']:.2f}x)"
    )
    for rank, phrase in bench.agreement().items():
        print(f"agreement r{rank}, kleinserve's batch vs diffusers one by one: {phrase}")
    warning = f" (over {DISTURBED:.0%}: disturbed, run again)" if others > DISTURBED else ""
    print(f"other processes' share of the cores while measuring: {others:.0%}{warning}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f} GiB")
    print()
    scope = "" if args.size == "4b" else " (informational: the targets are for the 4B size)"
    print(f"targets{scope}:")
    for rank in RANKS:
        ratio = median[f"diffusers r{rank}"] / median[f"batch r{rank}"]
        print(
            f"  (a) r{rank}: batch of {REQUESTS} different adapters vs diffusers one by one: {ratio:.2f}x "
            f"images/s >= {TARGET_BATCH}x {verdict(ratio >= TARGET_BATCH)}"
        )
    for rank in RANKS:
        one, none = median[f"one r{rank}"], median["none after"]
        overhead = one / none - 1
        goal = (
            f"<= {TARGET_ONE_ADAPTER:.0%} {verdict(overhead <= TARGET_ONE_ADAPTER)}"
            if rank == 16
            else "(info)"
        )
        print(f"  (b) r{rank}: one adapter vs none, batch 1: {change(one, none)} {goal}")
    drift = median["none after"] / median["none before"] - 1
    print(
        f"  (c) no adapters, wrapped vs never wrapped: {change(median['none after'], median['none before'])} "
        f"within {TARGET_NO_ADAPTER:.0%} {verdict(abs(drift) <= TARGET_NO_ADAPTER)}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=DEFAULTS, default="tiny")
    parser.add_argument(
        "--blocks",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=(1, 4),
        help="4b: double,single blocks of the real 5,20 (default 1,4)",
    )
    parser.add_argument("--rounds", type=int, help="measured rounds (tiny 9, 4b 3)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds, dropped (tiny 1, 4b 0)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before measuring, wait up to this many seconds for other processes to go quiet (0: never)",
    )
    args = parser.parse_args(argv)
    double, single = args.blocks
    if not (0 <= double <= 5 and 0 <= single <= 20 and double + single > 0):
        parser.error(f"--blocks {double},{single}: klein-4B has 5 double and 20 single blocks")
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(THREADS)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="kleinserve-bench-lora-") as work:
        start = time.perf_counter()
        if args.size == "4b":
            bench: Bench = TransformerBench(Path(work), dtype, args.dtype, args.blocks)
        else:
            bench = TinyBench(Path(work), dtype, args.dtype)
        log(f"set up in {time.perf_counter() - start:.0f} s")
        if (waited := wait_for_quiet(args.quiet_wait)) > 10:
            log(f"waited {waited:.0f} s for the other processes to go quiet")
        meter = OtherCpuMeter()
        seconds = measure(bench, args.rounds, args.warmup)
        report(args, bench, seconds, meter.fraction())


if __name__ == "__main__":
    main()
