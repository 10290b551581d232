"""keep_freed_memory: buffers an engine allocates again and again come back without page faults.

Each case runs in a fresh interpreter (the tuning is process-wide): three 8 MiB buffers are made and freed,
20 times over, and the minor page faults of the last 20 rounds are counted. 6,144 pages are touched a round.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kleinserve.engine.precision import keep_freed_memory

PAGES_PER_ROUND = 3 * (8 << 20) // 4096
_PROGRAM = """
import resource, sys
if sys.argv[1] == "tuned":  # the default case does not import kleinserve (torch: seconds)
    from kleinserve.engine.precision import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_():
    return [bytearray(8 << 20) for _ in range(3)]  # zero-filled: every page is touched
for _ in range(3):
    round_()
start = faults()
for _ in range(20):
    round_()
print((faults() - start) / 20)
"""


def faults_per_round(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return float(done.stdout)


@pytest.mark.skipif(not keep_freed_memory(), reason="not glibc")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    assert faults_per_round("tuned") < 0.01 * PAGES_PER_ROUND
    # The same rounds with glibc's defaults fault most pages in again: what the tuning is for.
    assert faults_per_round("default") > 0.3 * PAGES_PER_ROUND
