"""The engine benchmark's report (bench/engine.py): per size and configuration the medians of its rounds, a
table, drift (PSNR of int8 against fp32, the largest difference from stock) and a verdict per target."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine_child import GIB, STAGES, STEPS, THREADS, ChildResult  # bench/engine_child.py
from images import max_difference, pixels, psnr  # bench/images.py
from machine import cpu_line  # bench/machine.py

# Issue 19's targets at 4B: (configuration, images/s vs stock >=, peak RSS GiB <=, load seconds <=).
TARGETS = (("kleinserve", 1.2, 16.0, 12.0), ("kleinserve-int8", 1.6, 11.0, 20.0))


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

    def _compare(self, a: str, b: str, metric: Callable[[Any, Any], Any], combine: Callable[..., Any]) -> Any:
        first, second = self.results.get(a), self.results.get(b)
        if first is None or second is None or not (first.ok and second.ok):
            return None
        pairs = zip(first.images, second.images, strict=True)  # the images' paths
        return combine(metric(pixels(x), pixels(y)) for x, y in pairs)


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


def times(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"
