"""The engine survives a job store that refuses writes (jobs/writes.py): a write lock held by another
connection past the busy timeout, and a data dir on a tmpfs that fills up. Real SQLite, real files.

Before, one refused write killed the engine thread: jobs stayed queued or running forever, synchronous
callers waited forever and the worker still said ready.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kleinserve.engine import Pipeline
from kleinserve.errors import StoreUnavailable
from kleinserve.jobs.events import EventHub
from kleinserve.jobs.store import JobStatus, SqliteJobStore
from kleinserve.jobs.worker import Worker, WorkerSettings
from kleinserve.media import MediaStore
from kleinserve.objects import LocalObjects
from kleinserve.types import GenerateRequest
from tests.jobs.gate import WAIT_S, Gate
from tests.jobs.test_worker import reach, until

BUSY_TIMEOUT_S = 0.2


def _request(prompt: str) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, width=64, height=64, steps=3, seed=1)


def _worker(data_dir: Path, pipeline: Pipeline) -> Worker:
    store = SqliteJobStore(data_dir / "kleinserve.db", busy_timeout_s=BUSY_TIMEOUT_S)
    media = MediaStore(LocalObjects(data_dir), b"x" * 32)
    # Progress saved at every step: every step meets the refusing store too.
    worker = Worker(
        pipeline, store, media, data_dir / "inputs", EventHub(), WorkerSettings(progress_interval_s=0)
    )
    worker.start()
    return worker


def _stop(worker: Worker, gate: Gate) -> None:
    gate.release()
    worker.stop()
    worker.store.close()  # type: ignore[attr-defined]


def test_a_write_lock_held_elsewhere_defers_the_final_row_and_the_engine_goes_on(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    worker = _worker(tmp_path, pipeline)
    gate = Gate()
    holder = sqlite3.connect(tmp_path / "kleinserve.db", isolation_level=None)

    async def scenario() -> None:
        await until(lambda: worker.ready, "the worker is ready")
        pending = await worker.enqueue(_request("locked out"), "alice", on_step=gate)
        await reach(gate.reached)
        holder.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock past the busy timeout
        gate.release()
        outcome = await asyncio.wait_for(worker.wait(pending), WAIT_S)
        # The caller has its answer although neither the progress nor the final row could be written.
        assert outcome.job.status is JobStatus.SUCCEEDED and len(outcome.images) == 1
        assert worker.store.get(pending.job.id).status is JobStatus.RUNNING
        assert not worker.ready
        with pytest.raises(StoreUnavailable, match="not taking writes .*database is locked"):
            await worker.enqueue(_request("refused at once"), "alice")
        holder.execute("ROLLBACK")
        await until(lambda: worker.ready, "the worker is ready again")
        stored = worker.store.get(pending.job.id)
        assert stored.status is JobStatus.SUCCEEDED and stored.result == outcome.job.result
        assert stored.finished == outcome.job.finished  # when it ended, not when the row was written
        after = await asyncio.wait_for(worker.submit_and_wait(_request("after"), "alice"), WAIT_S)
        assert after.job.status is JobStatus.SUCCEEDED

    try:
        asyncio.run(scenario())
    finally:
        holder.close()
        _stop(worker, gate)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only: `make test` runs as root in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder: Path) -> Path:
    """Write zeros into `folder/filler` until the file system is full."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:  # unbuffered: closing it has nothing left to write
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_fails_the_job_with_the_reason_and_the_engine_goes_on(
    tiny_tmpfs: Path, pipeline: Pipeline
) -> None:
    worker = _worker(tiny_tmpfs, pipeline)
    gate = Gate()

    async def scenario() -> None:
        await until(lambda: worker.ready, "the worker is ready")
        pending = await worker.enqueue(_request("no room"), "alice", on_step=gate)
        await reach(gate.reached)
        filler = _fill(tiny_tmpfs)
        gate.release()
        outcome = await asyncio.wait_for(worker.wait(pending), WAIT_S)
        assert outcome.job.status is JobStatus.FAILED
        assert outcome.job.error == "storing the result failed (No space left on device)"
        with pytest.raises(StoreUnavailable):  # the store cannot take a new job's row now
            await worker.enqueue(_request("refused"), "alice")
        filler.unlink()
        await until(lambda: worker.ready, "the worker is ready again")
        stored = worker.store.get(pending.job.id)
        assert (stored.status, stored.error) == (JobStatus.FAILED, outcome.job.error)
        after = await asyncio.wait_for(worker.submit_and_wait(_request("after"), "alice"), WAIT_S)
        assert after.job.status is JobStatus.SUCCEEDED and len(after.images) == 1

    try:
        asyncio.run(scenario())
    finally:
        _stop(worker, gate)
