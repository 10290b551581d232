"""Worker driven directly: a real SqliteJobStore, MediaStore and EventHub, on the session's fp32 pipeline.

Slow paths are made deterministic with a blocking step callback (a `Gate`, run on the engine thread), never
with sleeps. Expected pixels are computed with `pipeline.generate` before the worker starts (the engine is
single-threaded), and every worker is stopped before its test ends.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kleinserve.engine import Pipeline
from kleinserve.engine.references import prepare_reference
from kleinserve.errors import Unavailable
from kleinserve.jobs.coordination import WANTS_PREVIEWS
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.record import JobParams
from kleinserve.jobs.store import MAX_ATTEMPTS, Job, JobStatus, SqliteJobStore
from kleinserve.jobs.worker import Worker, WorkerSettings
from kleinserve.media import MediaStore, ReferenceStore
from kleinserve.objects import LocalObjects
from kleinserve.types import GenerateRequest, Progress
from tests.conftest import max_difference, pixels, random_image
from tests.jobs.gate import WAIT_S, Gate


def _request(
    prompt: str = "a red circle", seed: int = 1, size: int = 64, steps: int = 2, **more: Any
) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, width=size, height=size, steps=steps, seed=seed, **more)


class StepLog:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, progress: Progress) -> None:
        self.steps.append(progress.step)


class Setup:
    """One data dir: store, media, hub, and the workers made on it (stopped after the test)."""

    def __init__(self, tmp_path: Path, pipeline: Pipeline) -> None:
        self.tmp_path = tmp_path
        self.pipeline = pipeline
        self.store = SqliteJobStore(tmp_path / "db")
        self.media = MediaStore(LocalObjects(tmp_path), b"x" * 32)
        self.hub = EventHub()
        self.inputs = tmp_path / "inputs"
        self.workers: list[Worker] = []
        self.gates: list[Gate] = []

    def worker(self, start: bool = True, **settings: Any) -> Worker:
        """A worker on this data dir, started (recovery, warm-up, engine thread) unless `start` is False."""
        worker = Worker(
            self.pipeline, self.store, self.media, self.inputs, self.hub, WorkerSettings(**settings)
        )
        self.workers.append(worker)
        if start:
            worker.start()
        return worker

    def gate(self) -> Gate:
        gate = Gate()
        self.gates.append(gate)
        return gate

    def stored(self, name: str) -> bytes:
        return self.media.read(name)

    def image(self, name: str) -> Image.Image:
        with Image.open(io.BytesIO(self.stored(name))) as image:
            image.load()
            return image.copy()

    def close(self) -> None:
        for gate in self.gates:
            gate.release()
        for worker in self.workers:
            worker.stop()
        self.store.close()


@pytest.fixture
def setup(tmp_path: Path, pipeline: Pipeline) -> Iterator[Setup]:
    made = Setup(tmp_path, pipeline)
    yield made
    made.close()


def run(setup: Setup, scenario: Callable[[], Any]) -> None:
    """asyncio.run with the hub attached to the loop."""

    async def main() -> None:
        setup.hub.attach(asyncio.get_running_loop())
        await scenario()

    asyncio.run(main())


async def reach(event: threading.Event) -> None:
    if not await asyncio.to_thread(event.wait, WAIT_S):
        raise AssertionError("the engine never reached the expected step")


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def finished(worker: Worker, job: Job) -> Job:
    """The job's row once it has ended (polled, as the async APIs' clients do)."""
    await until(lambda: worker.store.get(job.id).status.terminal, f"job {job.id} ended")
    return worker.store.get(job.id)


def test_submit_wait_succeeds_with_the_pipelines_pixels(setup: Setup, pipeline: Pipeline) -> None:
    request = _request("two circles", seed=41, num_images=2)
    expected = [pipeline.generate(_request("two circles", seed=seed)).images[0].image for seed in (41, 42)]
    worker = setup.worker()

    async def scenario() -> None:
        job = worker.submit(request, owner="alice")
        assert job.status is JobStatus.QUEUED
        assert setup.store.get(job.id, "alice").status is JobStatus.QUEUED
        done = await finished(worker, job)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.progress == 1.0
        assert done.attempts == 1
        assert done.result is not None and done.usage is not None
        assert done.result.seeds == [41, 42]
        assert (done.result.width, done.result.height, done.result.steps) == (64, 64, 2)
        assert done.usage.images == 2 and done.usage.tiles_out == 2
        for image, want in zip(done.result.images, expected, strict=True):
            assert (setup.tmp_path / "media" / image.media).is_file()
            assert max_difference(setup.image(image.media), want) <= 1

    run(setup, scenario)


def test_submit_and_wait_hands_over_the_stored_bytes(setup: Setup, pipeline: Pipeline) -> None:
    expected = pipeline.generate(_request("two squares", seed=5)).images[0].image
    worker = setup.worker()

    async def scenario() -> None:
        outcome = await asyncio.wait_for(
            worker.submit_and_wait(_request("two squares", seed=5), owner="alice"), WAIT_S
        )
        assert outcome.job.status is JobStatus.SUCCEEDED
        assert outcome.job == setup.store.get(outcome.job.id)  # the final row, already stored
        assert outcome.job.result is not None
        (image,) = outcome.job.result.images
        assert outcome.images == (setup.stored(image.media),)
        assert max_difference(setup.image(image.media), expected) <= 1

    run(setup, scenario)


@pytest.mark.parametrize(("interval_s", "stored_after_step_1"), [(0.0, 1 / 3), (3600.0, 0.0)])
def test_stored_progress_is_saved_at_most_once_per_progress_interval(
    setup: Setup, interval_s: float, stored_after_step_1: float
) -> None:
    worker = setup.worker(progress_interval_s=interval_s)
    gate = setup.gate()

    async def scenario() -> None:
        job = worker.submit(_request("progress", steps=3), owner="alice", on_step=gate)
        await reach(gate.reached)  # step 1 done; its progress was saved before the step callbacks ran, or not
        assert setup.store.get(job.id).progress == stored_after_step_1
        gate.release()
        assert (await finished(worker, job)).progress == 1.0  # the end is always stored

    run(setup, scenario)


def test_a_job_whose_caller_follows_its_steps_says_so_in_its_row(setup: Setup) -> None:
    # Another process's engine reads this mark to publish the job's previews from step 1 (pg_coordination).
    worker = setup.worker()
    gate = setup.gate()

    async def scenario() -> None:
        followed = worker.submit(_request("followed", steps=3), owner="alice", on_step=gate)
        unfollowed = worker.submit(_request("unfollowed"), owner="alice")
        assert setup.store.get(followed.id).extra == {WANTS_PREVIEWS: True}
        assert setup.store.get(unfollowed.id).extra == {}
        await reach(gate.reached)
        gate.release()
        for job in (followed, unfollowed):
            assert (await finished(worker, job)).status is JobStatus.SUCCEEDED

    run(setup, scenario)


def test_cancelling_the_waiting_caller_cancels_its_job(setup: Setup) -> None:
    # A sync client that disconnects: its request's task is cancelled, and so must its job be.
    worker = setup.worker()
    gate = setup.gate()

    async def scenario() -> None:
        blocker = worker.submit(_request("blocker"), owner="alice", on_step=gate)
        await reach(gate.reached)
        waiting = asyncio.create_task(worker.submit_and_wait(_request("impatient"), owner="bob"))
        await until(lambda: len(setup.store.queued()) == 1, "the caller's job is queued")
        (queued,) = setup.store.queued()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # On a thread (a store call may wait on a lock), so very soon rather than at once.
        await until(lambda: setup.store.get(queued.id).status is JobStatus.CANCELLED, "the job is cancelled")
        gate.release()
        assert (await finished(worker, blocker)).status is JobStatus.SUCCEEDED
        assert setup.store.get(queued.id).started is None  # it never ran

    run(setup, scenario)


def test_a_submit_whose_row_cannot_be_stored_leaves_nothing_behind(setup: Setup) -> None:
    # The database refuses the row (a real SQLite error): no reference file, step listener or waiter stays.
    refuse = "CREATE TRIGGER refuse BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'full'); END"
    setup.store._db.execute(refuse)
    worker = setup.worker(start=False)
    request = _request("refused", reference_images=(random_image(64, 64, seed=1),))

    async def scenario() -> None:
        ended = asyncio.get_running_loop().create_future()
        with pytest.raises(sqlite3.IntegrityError, match="full"):
            worker.submit(request, owner="alice", on_step=StepLog(), ended=ended)

    asyncio.run(scenario())
    assert list(setup.inputs.iterdir()) == []
    assert not worker.coordination._listeners and not worker.coordination._waiters  # type: ignore[attr-defined]


def test_reference_images_are_stored_prepared_as_png_and_reload_identically(
    setup: Setup, pipeline: Pipeline
) -> None:
    reference = random_image(72, 80, seed=3, mode="RGBA")
    request = _request("edit it", seed=5, reference_images=(reference,))
    expected = pipeline.generate(request).images[0].image
    prepared = prepare_reference(reference)  # RGB, cropped to 64x80
    worker = setup.worker()

    async def scenario() -> None:
        job = worker.submit(request, owner="alice")
        assert job.reference_count == 1
        assert job.params.reference_sizes == ((64, 80),)  # the processed size, known at submit time
        stored = io.BytesIO(worker.references.objects.get(worker.references.key(job.id, 0)))
        with Image.open(stored) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert (pixels(image) == pixels(prepared.image)).all()
        reloaded = worker.load_request(job)
        assert len(reloaded.reference_images) == 1
        assert (pixels(reloaded.reference_images[0]) == pixels(prepared.image)).all()
        assert (reloaded.prompt, reloaded.seed, reloaded.width, reloaded.steps) == ("edit it", 5, 64, 2)
        [restored] = pipeline.restore(reloaded).references  # prepared once: the same pixels, not again
        assert (restored.pixels == prepared.pixels).all()
        done = await finished(worker, job)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.result is not None
        assert max_difference(setup.image(done.result.images[0].media), expected) <= 1

    run(setup, scenario)


def test_compatible_jobs_run_as_one_batch_without_starving_older_ones(setup: Setup) -> None:
    worker = setup.worker(max_batch=2)
    gate = setup.gate()

    async def scenario() -> None:
        blocker = worker.submit(_request("blocker"), owner="alice", on_step=gate)
        await reach(gate.reached)
        first = worker.submit(_request("first", seed=10), owner="alice")
        other = worker.submit(_request("other size", size=80), owner="bob")  # incompatible, older
        second = worker.submit(_request("second", seed=20), owner="carol")
        third = worker.submit(_request("third", seed=30), owner="alice")
        assert [job.id for job in setup.store.queued()] == [first.id, other.id, second.id, third.id]
        gate.release()
        jobs = [await finished(worker, job) for job in (blocker, first, other, second, third)]
        assert all(job.status is JobStatus.SUCCEEDED for job in jobs), [job.error for job in jobs]
        blocker, first, other, second, third = jobs
        assert first.started == second.started  # one engine call, up to max_batch images
        assert first.started is not None and other.started is not None and third.started is not None
        assert first.started < other.started < third.started  # the older job beats younger compatible ones
        assert first.result is not None and second.result is not None
        assert first.result.images[0].seed == 10 and second.result.images[0].seed == 20
        sample = worker.metrics.registry.get_sample_value
        assert sample("kleinserve_batch_images_count") == 4  # blocker, [first, second], other, third
        assert sample("kleinserve_batch_images_sum") == 5
        assert sample("kleinserve_batch_images_bucket", {"le": "1.0"}) == 3

    run(setup, scenario)


def test_three_compatible_jobs_share_one_batch(setup: Setup, pipeline: Pipeline) -> None:
    expected = pipeline.generate(_request("second", seed=20)).images[0].image
    worker = setup.worker(max_batch=4)
    gate = setup.gate()

    async def scenario() -> None:
        blocker = worker.submit(_request("blocker"), owner="alice", on_step=gate)
        await reach(gate.reached)
        first = worker.submit(_request("first", seed=10), owner="alice")
        other = worker.submit(_request("other size", size=80), owner="bob")
        second = worker.submit(_request("second", seed=20), owner="alice")
        third = worker.submit(_request("third", seed=30), owner="alice")
        gate.release()
        jobs = [await finished(worker, job) for job in (blocker, first, other, second, third)]
        assert all(job.status is JobStatus.SUCCEEDED for job in jobs), [job.error for job in jobs]
        _, first, other, second, third = jobs
        assert first.started == second.started == third.started
        assert first.started is not None and other.started is not None and first.started < other.started
        assert worker.metrics.registry.get_sample_value("kleinserve_batch_images_bucket", {"le": "3.0"}) == 3
        assert second.result is not None  # batching does not change an image
        assert max_difference(setup.image(second.result.images[0].media), expected) <= 1

    run(setup, scenario)


def test_step_previews_are_made_only_for_subscribers_that_want_them(setup: Setup) -> None:
    # A job nobody watches must not pay a VAE decode + PNG per step (the server's overhead).
    worker = setup.worker()

    async def steps(previews: bool) -> list[dict]:
        gate = setup.gate()  # the engine is busy with a blocker until both listeners have subscribed
        blocker = worker.submit(_request("blocker"), owner="alice", on_step=gate)
        await reach(gate.reached)
        job = worker.submit(_request(f"previews {previews}", steps=3), owner="alice")
        events: list[dict] = []
        async with setup.hub.subscribe(job.id, previews=previews) as queue:
            gate.release()
            while not events or events[-1]["type"] not in ("succeeded", "failed", "cancelled"):
                events.append(await asyncio.wait_for(queue.get(), WAIT_S))
        assert events[-1]["type"] == "succeeded"
        assert (await finished(worker, blocker)).status is JobStatus.SUCCEEDED
        return [event for event in events if event["type"] == "step"]

    async def scenario() -> None:
        watched = await steps(previews=True)
        assert [event["step"] for event in watched] == [1, 2, 3]
        assert all(event["preview"] for event in watched)
        waited = await steps(previews=False)
        assert [event["step"] for event in waited] == [1, 2, 3]
        assert not any("preview" in event for event in waited)
        assert not setup.hub.wants_previews("any job")

    run(setup, scenario)


def test_in_a_batch_only_the_watched_job_gets_previews(setup: Setup) -> None:
    worker = setup.worker(max_batch=2)
    gate = setup.gate()

    async def scenario() -> None:
        blocker = worker.submit(_request("blocker"), owner="alice", on_step=gate)
        await reach(gate.reached)
        # Two compatible jobs queued behind the blocker: they run as one batch.
        watched, unwatched = (worker.submit(_request(p, steps=2), owner="alice") for p in ("a", "b"))
        events: dict[str, list[dict]] = {watched.id: [], unwatched.id: []}
        async with (
            setup.hub.subscribe(watched.id) as watched_queue,
            setup.hub.subscribe(unwatched.id, previews=False) as unwatched_queue,
        ):
            gate.release()
            for job_id, queue in ((watched.id, watched_queue), (unwatched.id, unwatched_queue)):
                while not events[job_id] or events[job_id][-1]["type"] != "succeeded":
                    events[job_id].append(await asyncio.wait_for(queue.get(), WAIT_S))
        assert (await finished(worker, blocker)).status is JobStatus.SUCCEEDED
        steps = {job_id: [e for e in found if e["type"] == "step"] for job_id, found in events.items()}
        assert len(steps[watched.id]) == len(steps[unwatched.id]) == 2
        assert all(event["preview"] for event in steps[watched.id])
        assert not any("preview" in event for event in steps[unwatched.id])
        assert setup.store.get(watched.id).started == setup.store.get(unwatched.id).started  # one batch

    run(setup, scenario)


def test_cancelling_a_queued_job_is_immediate_and_it_never_runs(setup: Setup) -> None:
    worker = setup.worker()
    gate = setup.gate()
    left = StepLog()

    async def scenario() -> None:
        blocker = worker.submit(_request("blocker"), owner="alice", on_step=gate)
        await reach(gate.reached)
        leaving = worker.submit(_request("leaves"), owner="bob", on_step=left)
        with pytest.raises(Exception, match="no job"):
            worker.cancel(leaving.id, "alice")  # not alice's job
        cancelled = worker.cancel(leaving.id, "bob")
        assert cancelled.status is JobStatus.CANCELLED  # at once, while the engine is still busy
        assert not gate.opened.is_set()
        assert (await finished(worker, leaving)).status is JobStatus.CANCELLED
        gate.release()
        assert (await finished(worker, blocker)).status is JobStatus.SUCCEEDED
        after = await finished(worker, worker.submit(_request("after"), owner="bob"))
        assert after.status is JobStatus.SUCCEEDED
        never = setup.store.get(leaving.id)
        assert never.started is None and never.attempts == 0
        assert left.steps == []

    run(setup, scenario)


def test_cancelling_a_running_job_stops_it_at_the_next_step(setup: Setup) -> None:
    worker = setup.worker()
    gate = setup.gate()

    async def scenario() -> None:
        job = worker.submit(_request("long", steps=8), owner="alice", on_step=gate)
        await reach(gate.reached)  # step 1 done, the engine thread held inside the callback
        flagged = worker.cancel(job.id, "alice")
        assert flagged.status is JobStatus.RUNNING and flagged.cancel_requested
        gate.release()
        done = await finished(worker, job)
        assert done.status is JobStatus.CANCELLED
        assert done.error == "cancelled by the client"
        assert done.result is None
        assert 0 < done.progress < 1
        assert gate.steps == [1]
        # Alone in its batch, the engine stopped: two steps ran, not eight.
        assert worker.metrics.registry.get_sample_value("kleinserve_denoising_step_seconds_count") == 2
        after = await finished(worker, worker.submit(_request("after"), owner="alice"))
        assert after.status is JobStatus.SUCCEEDED

    run(setup, scenario)


def test_a_job_batched_with_a_cancelled_one_still_succeeds(setup: Setup, pipeline: Pipeline) -> None:
    expected = pipeline.generate(_request("stays", seed=7, steps=4)).images[0].image
    worker = setup.worker(start=False)
    gate = setup.gate()

    async def scenario() -> None:
        # Queued before the engine starts: both are waiting when it picks its first batch.
        leaving = worker.submit(_request("leaves", seed=3, steps=4), owner="alice", on_step=gate)
        staying = worker.submit(_request("stays", seed=7, steps=4), owner="bob")
        worker.start()
        await reach(gate.reached)
        assert setup.store.get(staying.id).status is JobStatus.RUNNING  # in the same batch
        worker.cancel(leaving.id, "alice")
        gate.release()
        cancelled, done = await finished(worker, leaving), await finished(worker, staying)
        assert cancelled.status is JobStatus.CANCELLED
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert cancelled.started == done.started
        assert done.result is not None
        assert max_difference(setup.image(done.result.images[0].media), expected) <= 1

    run(setup, scenario)


def test_drain_refuses_new_work_and_keeps_the_queue(setup: Setup) -> None:
    worker = setup.worker()
    gate = setup.gate()

    async def scenario() -> None:
        running = worker.submit(_request("running"), owner="alice", on_step=gate)
        await reach(gate.reached)
        queued = worker.submit(_request("queued"), owner="alice")
        worker.drain()
        assert not worker.ready
        with pytest.raises(Unavailable) as refused:
            worker.submit(_request("late"), owner="alice")
        assert refused.value.status == 503
        assert refused.value.retry_after >= 1
        gate.release()
        assert (await finished(worker, running)).status is JobStatus.SUCCEEDED  # the running batch ends
        await asyncio.to_thread(worker.wait_idle)
        await asyncio.to_thread(worker.stop)
        assert setup.store.get(queued.id).status is JobStatus.QUEUED  # kept for the next start
        assert [job.id for job in setup.store.queued()] == [queued.id]

    run(setup, scenario)


def test_stop_lets_the_running_batch_finish(setup: Setup) -> None:
    worker = setup.worker()
    gate = setup.gate()

    async def scenario() -> None:
        running = worker.submit(_request("running", steps=3), owner="alice", on_step=gate)
        await reach(gate.reached)
        stopping = asyncio.ensure_future(asyncio.to_thread(worker.stop))
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waiting for the batch
        gate.release()
        await asyncio.wait_for(stopping, WAIT_S)
        done = setup.store.get(running.id)
        assert done.status is JobStatus.SUCCEEDED, done.error  # finished and stored, not abandoned
        assert gate.steps == [1, 2, 3]
        with pytest.raises(Unavailable):
            worker.submit(_request(), owner="alice")

    run(setup, scenario)


def _crashed_job(setup: Setup, request: GenerateRequest, attempts: int, prepared: bool = True) -> Job:
    """A job row as a crash leaves it: running, with its input files beside it (as given, in RGB, where not
    `prepared`: as versions before prepared references kept them)."""
    resolved = setup.pipeline.resolve(request)
    job = Job(
        id="crashed" + str(attempts),
        owner="alice",
        status=JobStatus.RUNNING,
        params=JobParams.from_resolved(resolved),
        reference_count=len(request.reference_images),
        batch_key=repr(resolved.batch_key),
        created=time.time() - 60,
        started=time.time() - 30,
        attempts=attempts,
        progress=0.5,
    )
    references = resolved.stored if prepared else resolved.request
    ReferenceStore(setup.inputs).save(job.id, references.reference_images)
    return setup.store.add(job)


def test_a_job_interrupted_by_a_crash_is_run_again(setup: Setup, pipeline: Pipeline) -> None:
    request = _request("interrupted", seed=9, reference_images=(random_image(80, 64, seed=4),))
    expected = pipeline.generate(request).images[0].image
    job = _crashed_job(setup, request, attempts=1)
    worker = setup.worker()

    async def scenario() -> None:
        done = await finished(worker, job)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.attempts == 2
        assert done.result is not None
        assert max_difference(setup.image(done.result.images[0].media), expected) <= 1

    run(setup, scenario)


def test_a_job_stored_with_unprepared_references_runs_the_same(setup: Setup, pipeline: Pipeline) -> None:
    request = _request("kept as given", seed=3, reference_images=(random_image(72, 80, seed=6),))
    expected = pipeline.generate(request).images[0].image
    job = _crashed_job(setup, request, attempts=1, prepared=False)
    worker = setup.worker()

    async def scenario() -> None:
        done = await finished(worker, job)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.result is not None
        assert max_difference(setup.image(done.result.images[0].media), expected) <= 1

    run(setup, scenario)


def test_a_job_interrupted_too_often_fails_with_the_reason(setup: Setup) -> None:
    job = _crashed_job(setup, _request("interrupted"), attempts=MAX_ATTEMPTS)
    worker = setup.worker()

    async def scenario() -> None:
        done = await finished(worker, job)
        assert done.status is JobStatus.FAILED
        assert done.error == f"interrupted {MAX_ATTEMPTS} times by a server crash"
        assert done.attempts == MAX_ATTEMPTS
        assert done.result is None

    run(setup, scenario)


def test_warm_up_sets_ready(setup: Setup) -> None:
    worker = setup.worker(start=False)
    assert not worker.ready

    async def scenario() -> None:
        worker.start()
        await until(lambda: worker.ready, "the worker is warmed up")
        worker.drain()
        assert not worker.ready

    run(setup, scenario)


def test_run_engine_runs_the_jobs_on_the_calling_thread_until_stopped(
    setup: Setup, pipeline: Pipeline
) -> None:
    # `kleinserve serve` runs the engine on the thread that loaded the weights (worker.py says why).
    request = _request("on the caller", seed=5)
    expected = pipeline.generate(request).images[0].image
    worker = setup.worker(start=False)
    engine_threads: set[threading.Thread] = set()
    job = worker.submit(
        request, owner="alice", on_step=lambda _: engine_threads.add(threading.current_thread())
    )

    def stop_when_done() -> None:
        deadline = time.monotonic() + WAIT_S
        while not setup.store.get(job.id).status.terminal and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.stop()

    threading.Thread(target=stop_when_done).start()
    worker.start(engine_thread=False)
    worker.run_engine()  # returns once stop() has been called
    done = setup.store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert engine_threads == {threading.current_thread()}
    assert done.result is not None
    assert max_difference(setup.image(done.result.images[0].media), expected) <= 1


def test_run_engine_returns_when_stopped_before_start(setup: Setup) -> None:
    worker = setup.worker(start=False)
    worker.stop()  # e.g. the HTTP server failed to start, so its lifespan never called start()
    engine = threading.Thread(target=worker.run_engine, daemon=True)
    engine.start()
    engine.join(WAIT_S)
    assert not engine.is_alive()  # it stopped waiting for start() instead of blocking the engine thread
