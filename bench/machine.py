"""The machine a benchmark ran on, printed at its start: CPU model, core count and the instruction-set flags
that decide the engine's fast CPU path (bf16 where AVX512_BF16/AMX exist, fp32 elsewhere; oneDNN packing of
bf16 needs AVX512BW/VL/DQ or AVX_NE_CONVERT; VNNI for int8)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "avx_ne_convert",
    "amx_bf16",
    "amx_int8",
)


def cpu_line() -> str:
    """E.g. "AMD EPYC, 2 cores; bf16/VNNI flags: avx2 (no avx512f avx512bw ...)"."""
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if flags and model:
                break
    present = [flag for flag in FLAGS if flag in flags]
    absent = [flag for flag in FLAGS if flag not in flags]
    return (
        f"{model}, {os.cpu_count()} cores; bf16/VNNI flags: {' '.join(present) or 'none'}"
        f" (absent: {' '.join(absent) or 'none'})"
    )
