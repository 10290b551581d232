"""EngineRunner: one engine thread and a bounded queue of waiting requests.

    runner = EngineRunner(pipeline, max_waiting=64)
    runner.start()
    result = await runner.generate(request, on_step=...)   # raises Overloaded when the queue is full

The engine is not thread-safe and a CPU or GPU runs one batch at a time, so all engine work goes through one
thread. Waiting requests are cheap; beyond `max_waiting` of them the runner refuses new work at once (the
dialects answer 429 with Retry-After). A caller that stops waiting (client disconnect: its task is
cancelled) frees its place at once if its work has not started, or has it cancelled at the next denoising
step. Guarded by tests/jobs/test_runner.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from dataclasses import dataclass, field

from kleinserve.engine.pipeline import Pipeline, ResolvedRequest
from kleinserve.errors import Cancelled, Overloaded, Unavailable
from kleinserve.types import GenerateRequest, GenerateResult, StepCallback

log = logging.getLogger(__name__)

DEFAULT_MAX_WAITING = 64


@dataclass(eq=False)  # identity comparison: removed from the waiting line by identity
class _Work:
    request: ResolvedRequest
    on_step: StepCallback | None
    future: asyncio.Future[GenerateResult]
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)


class EngineRunner:
    """Serialises engine access; `generate` is awaited from the event loop, the engine runs on a thread."""

    def __init__(self, pipeline: Pipeline, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        self.pipeline = pipeline
        self.max_waiting = max_waiting
        self._line: collections.deque[_Work] = collections.deque()  # accepted, not started; under _changed
        self._changed = threading.Condition()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="kleinserve-engine", daemon=True)

    @property
    def waiting(self) -> int:
        """Requests accepted but not yet started."""
        return len(self._line)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new work, let the running and waiting requests finish, and end the thread."""
        with self._changed:
            self._accepting = False
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        """Check a request against the loaded model (InvalidInput before anything is queued)."""
        return self.pipeline.resolve(request)

    async def generate(self, request: GenerateRequest, on_step: StepCallback | None = None) -> GenerateResult:
        """Queue `request` and wait for its result; cancelling the awaiting task cancels the work."""
        # Off the event loop: checking references resizes and converts up to four images.
        resolved = await asyncio.to_thread(self.resolve, request)
        loop = asyncio.get_running_loop()
        work = _Work(resolved, on_step, loop.create_future(), loop)
        with self._changed:
            if not self._accepting:
                raise Unavailable("the server is shutting down", retry_after=30)
            if len(self._line) >= self.max_waiting:
                raise Overloaded(
                    f"{len(self._line)} requests are already waiting (queue limit {self.max_waiting})",
                    retry_after=max(1, len(self._line)),
                )
            self._line.append(work)
            self._changed.notify()
        try:
            return await asyncio.shield(work.future)
        except asyncio.CancelledError:
            with self._changed:
                work.cancel.set()  # running: the engine stops at its next step
                with contextlib.suppress(ValueError):
                    self._line.remove(work)  # waiting: its place (and its memory) is free at once
            raise

    def _next(self) -> _Work | None:
        """The next work to run, waiting for one; None once stopped and drained."""
        with self._changed:
            while not self._line:
                if not self._accepting:
                    return None
                self._changed.wait()
            return self._line.popleft()

    def _run(self) -> None:
        while (work := self._next()) is not None:
            try:
                result = self.pipeline.generate_batch(
                    [work.request], on_step=work.on_step, cancelled=work.cancel.is_set
                )[0]
            except Exception as exc:  # delivered to the awaiting request, which renders it
                if not isinstance(exc, Cancelled):
                    log.exception("engine failed")
                self._deliver(work, exception=exc)
            else:
                self._deliver(work, result=result)

    @staticmethod
    def _deliver(
        work: _Work, result: GenerateResult | None = None, exception: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if work.future.done() or work.cancel.is_set():
                return  # nobody is waiting any more
            if exception is not None:
                work.future.set_exception(exception)
            else:
                work.future.set_result(result)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # the event loop is already closed
            work.loop.call_soon_threadsafe(settle)
