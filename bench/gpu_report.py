"""bench/gpu.py's report: the drift checks between configurations' images, the environment, the markdown
table and issue 21's verdicts (the module docstring of bench/gpu.py says what each one means)."""

from __future__ import annotations

import platform
import time
from typing import TYPE_CHECKING, Any

from images import max_difference, psnr  # bench/images.py

if TYPE_CHECKING:
    import torch

# Issue 21's targets at 1024x1024, batch 1, end to end (the call and its PNG encoding), in seconds.
TARGETS = {"kleinserve-compiled": 0.30, "kleinserve-fp8-compiled": 0.20}
SGLANG_H100_SECONDS = 0.3996  # SGLang's CI, klein-4B, 1024x1024, 4 steps, H100 (performance.md section 4)


def check_report(checks: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Per side: the drifts the module docstring lists (absent where a configuration did not run)."""
    report: dict[str, dict[str, float]] = {}
    for side, images in checks.items():
        found: dict[str, float] = {}

        def compare(
            label: str, a: str, b: str, metric: Any, images: dict = images, found: dict = found
        ) -> None:
            if a in images and b in images:
                found[label] = metric(images[a], images[b])

        compare("diffusers_bf16_vs_fp32_max_difference", "stock", "diffusers-fp32", max_difference)
        compare("kleinserve_vs_stock_max_difference", "kleinserve", "stock", max_difference)
        compare("kleinserve_vs_fp32_max_difference", "kleinserve", "diffusers-fp32", max_difference)
        compare("compiled_vs_eager_max_difference", "kleinserve-compiled", "kleinserve", max_difference)
        compare("compiled_vs_stock_max_difference", "kleinserve-compiled", "stock", max_difference)
        for fp8 in ("kleinserve-fp8", "kleinserve-fp8-compiled"):
            compare(f"{fp8}_psnr_vs_bf16", fp8, "kleinserve", psnr)
            compare(f"{fp8}_psnr_vs_fp32", fp8, "diffusers-fp32", psnr)
        report[str(side)] = found
    return report


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    import kleinserve

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "kleinserve": kleinserve.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.type == "cuda":
        env["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| config | side | batch | s/call | images/s | text s | step s (each) | VAE s | PNG s | peak GiB "
        "| warm-up s (compile incl.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, config in results["configs"].items():
        if "error" in config or "skipped" in config:
            lines.append(f"| {name} | - | - | {config.get('error') or config.get('skipped')} |||||||")
            continue
        for key, run in config["runs"].items():
            side, batch = key.split("x")
            steps = " / ".join(f"{s:.3f}" for s in run["steps"])
            lines.append(
                f"| {name} | {side} | {batch} | {run['seconds']:.3f} | {run['images_per_second']:.2f} | "
                f"{run['text']:.3f} | {steps} | {run['vae']:.3f} | {run['png']:.3f} | "
                f"{run['peak_memory_bytes'] / 2**30:.1f} | {run['warmup_seconds']:.1f} |"
            )
    for side, found in results["checks"].items():
        lines.append(f"\nchecks at {side}x{side}: " + ", ".join(f"{k} = {v:.1f}" for k, v in found.items()))
    lines.extend(["", *target_lines(results)])
    for name, config in results["configs"].items():
        if server := config.get("server"):
            lines.append(
                f"\nserver ({name}, {server['side']}px, {server['clients']} clients, max batch "
                f"{server['max_batch']}): {server['images_per_second']:.2f} images/s, p50 "
                f"{server['p50_seconds']:.3f} s, p95 {server['p95_seconds']:.3f} s"
            )
    return "\n".join(lines)


def target_lines(results: dict[str, Any]) -> list[str]:
    """Issue 21's verdicts at 1024x1024, batch 1: each target, stock diffusers, SGLang's H100 figure, and the
    bf16 pixels within diffusers' own bf16 drift."""
    configs, lines = results["configs"], []

    def end_to_end(name: str) -> float | None:
        run = configs.get(name, {}).get("runs", {}).get("1024x1")
        return None if run is None else run["seconds"] + run["png"]

    stock = end_to_end("stock")
    for name in configs:  # in the order they ran
        if name == "stock" or (seconds := end_to_end(name)) is None:
            continue
        line = f"{name}: {seconds:.3f} s end to end at 1024x1024"
        if stock is not None:
            line += f", {stock / seconds:.2f}x stock ({stock:.3f} s)"
        line += f", {SGLANG_H100_SECONDS / seconds:.2f}x SGLang's H100 {SGLANG_H100_SECONDS} s"
        if name in TARGETS:
            line += f"; target <= {TARGETS[name]} s: {'MET' if seconds <= TARGETS[name] else 'NOT MET'}"
        lines.append(line)
    for side, found in results["checks"].items():
        if "kleinserve_vs_stock_max_difference" in found and "diffusers_bf16_vs_fp32_max_difference" in found:
            ours, bound = (
                found["kleinserve_vs_stock_max_difference"],
                found["diffusers_bf16_vs_fp32_max_difference"],
            )
            verdict = "MET" if ours <= max(bound, 1) else "NOT MET"
            lines.append(
                f"bf16 pixels at {side}: {ours:.0f}/255 from stock, bound {bound:.0f}/255: {verdict}"
            )
    return lines
