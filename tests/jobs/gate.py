"""Holding the engine thread still, so that queue and cancel tests need no sleeps."""

from __future__ import annotations

import threading

from kleinserve.types import Progress

WAIT_S = 20  # upper bound for anything the tests wait for; never reached when things work


class Gate:
    """An on_step callback that holds the engine thread at step 1 until `release()`."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()
        self.steps: list[int] = []

    def __call__(self, progress: Progress) -> None:
        self.steps.append(progress.step)
        self.reached.set()
        if not self.opened.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")

    def release(self) -> None:
        self.opened.set()
