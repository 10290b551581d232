"""The job row, its codec, and the values the job stores exchange with their callers (re-exported by
jobs/store.py, where callers import them from).

Job lifecycle: queued -> running -> succeeded | failed | cancelled. A worker takes queued jobs by a claim:
they become `running` under its name, a fencing token (`fence`, new and larger at every claim in the whole
store) and a lease (`lease_until`, Unix s) that the worker extends at every step. A job whose lease ran out
(its worker died or lost the database) is queued again once, then failed with a reason; a result written with
a fence that no longer holds is refused (LeaseLost), so a worker presumed dead cannot overwrite the rerun's.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from kleinserve.jobs.record import JobParams, JobResult, JobUsage, from_json, to_json
from kleinserve.types import json_bytes

MAX_ATTEMPTS = 2  # the first run and one retry after a crash or a lost lease
# A claim's lease in seconds. The worker extends it at every step and every few seconds besides, so it only
# runs out when the worker is gone: a rerun then starts after at most this long.
LEASE_S = 20.0


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class Job:
    """One row. `params` is the request without its images, `result` a succeeded job's images and the
    parameters used, `usage` its metering (jobs/record.py); times are Unix seconds.

    `model` is the variant the job is for ("" in rows from before models were recorded: any worker may run
    it); `worker`, `fence` and `lease_until` describe the claim a running job is under (None, 0, None before
    its first claim)."""

    id: str
    owner: str
    status: JobStatus
    params: JobParams
    reference_count: int
    batch_key: str
    created: float
    started: float | None = None
    finished: float | None = None
    progress: float = 0.0
    attempts: int = 0
    error: str | None = None
    result: JobResult | None = None
    usage: JobUsage | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_status: str | None = None
    cancel_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    worker: str | None = None
    fence: int = 0
    lease_until: float | None = None


class Load(NamedTuple):
    """What the submit limits look at: queued jobs of all keys, and queued + running jobs of one key."""

    queued: int
    in_flight: int


class SubmitLimits(NamedTuple):
    """A submit is refused (Overloaded) when `max_waiting` jobs of all keys are queued, or
    `max_in_flight_per_key` jobs of the submitting key are queued or running."""

    max_waiting: int
    max_in_flight_per_key: int


class StepCheck(NamedTuple):
    """What a running batch learns at a step (`JobStore.extend`): the ids whose cancel was asked, and the ids
    no longer running under its fence (their lease was taken over, or they ended): the batch drops both."""

    cancel_requested: frozenset[str]
    lost: frozenset[str]


class LeaseLost(Exception):
    """`finish(..., fence=f)` on a job no longer running under fence `f`: its lease ran out and the job was
    queued again (or ended), so this worker's result is stale and was not written. Never reaches a client."""


def new_job_id() -> str:
    """Unguessable: 128 random bits."""
    return secrets.token_hex(16)


# The row: a column per Job field (COLUMNS, in order), plus `images` (params.num_images, by which claims
# fill batches) and the webhook outbox's claim. JSON columns hold text, from the records' codec (record.py).
COLUMNS = tuple(job_field.name for job_field in fields(Job))
_RECORDS: dict[str, type[JobParams | JobResult | JobUsage]] = {
    "params": JobParams,
    "result": JobResult,
    "usage": JobUsage,
}
_JSON = (*_RECORDS, "extra")


def stored(column: str, value: Any) -> Any:
    """A value as its column stores it: JSON text for the JSON columns (records through their codec)."""
    if column not in _JSON or value is None:
        return value
    return json_bytes(to_json(value) if column in _RECORDS else value).decode()


def from_row(row: Sequence[Any]) -> Job:
    """The Job a row of COLUMNS holds (as both databases return it)."""
    values = dict(zip(COLUMNS, row, strict=True))
    for name in _JSON:
        values[name] = orjson.loads(values[name]) if values[name] is not None else None
    for name, record in _RECORDS.items():
        if values[name] is not None:
            values[name] = from_json(record, values[name])
    values["status"] = JobStatus(values["status"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["extra"] = values["extra"] or {}
    return Job(**values)
