"""What the API answers and takes, as types: the job document, a new job, a page of jobs,
and the answers of the queue and dead letter operations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Required, TypedDict


class Progress(TypedDict):
    """A Python handler's latest progress report."""

    value: float
    message: str
    at: str


class HistoryEntry(TypedDict):
    """One finished attempt of a job."""

    attempt: int
    daemon: str | None
    started_at: str | None
    finished_at: str | None
    outcome: str  # completed, retry, failed, cancelled, or lost
    error: str | None


class Job(TypedDict):
    """The job document, as `GET /jobs/ID` answers it (docs/api.md): times are RFC 3339 UTC
    strings; a newer daemon's added fields are there too, untyped."""

    id: str
    type: str
    queue: str
    state: str
    payload: Any
    attempts: int
    max_attempts: int
    created_at: str
    run_at: str | None
    started_at: str | None
    finished_at: str | None
    result: Any
    error: str | None
    daemon: str | None
    cancel_requested: bool
    idempotency_key: str | None
    callback_url: str | None
    priority: int
    waiting_for: str | None
    progress: Progress | None
    history: list[HistoryEntry]


class TraceContext(TypedDict, total=False):
    """The submitter's W3C Trace Context, for a daemon with [tracing] to continue its trace."""

    traceparent: str
    tracestate: str


class NewJob(TypedDict, total=False):
    """One job of `submit_many`: the fields of `submit`, `type` required."""

    type: Required[str]
    payload: Any
    delay: float | timedelta
    run_at: datetime | str | float
    priority: int
    idempotency_key: str
    callback_url: str
    max_attempts: int
    trace: TraceContext


class QueueState(TypedDict):
    """The answer to pause and resume."""

    queue: str
    paused: bool


class Purged(TypedDict):
    """The answer to purge: how many of the queue's jobs in that state it deleted."""

    queue: str
    state: str
    removed: int


class Retried(TypedDict):
    """The answer to retry_dead: how many dead letters went back, and the filters."""

    retried: int
    queue: str | None
    type: str | None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, newest first; `next_cursor` asks for the next, None at the end."""

    jobs: list[Job]
    next_cursor: str | None
