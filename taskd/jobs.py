"""The job record: its fields, its states, its ids and how it is shown to people."""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# States a job moves through: queued -> active -> completed, or back to scheduled for a
# retry, or failed once out of attempts (a dead letter). Delayed jobs start scheduled.
# Queued, scheduled and active jobs can be cancelled.
QUEUED = "queued"
SCHEDULED = "scheduled"
ACTIVE = "active"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STATES = (QUEUED, SCHEDULED, ACTIVE, COMPLETED, FAILED, CANCELLED)
FINAL_STATES = (COMPLETED, FAILED, CANCELLED)
# What a queue's purge deletes: its waiting jobs, or its dead letters; never running ones.
PURGEABLE = (QUEUED, SCHEDULED, FAILED)
# Priorities run from 0 to 9, higher first; a job without one gets the middle, so that
# both urgent and background work can be told apart from the ordinary.
PRIORITIES = range(10)
DEFAULT_PRIORITY = 5
# Random bytes read at once for new ids: 512 ids' worth.
RANDOM_POOL = 4096


# Not frozen: a daemon builds one per job it starts, and a frozen dataclass's __init__
# (object.__setattr__ per field) took 2.7 µs of the ~50 µs a job cost, a plain one 0.7.
# Treat it as a value all the same: nothing changes a Job once built.
@dataclass(slots=True)
class Job:
    """One job as stored in Redis; times are epoch milliseconds."""

    id: str
    type: str
    queue: str
    payload: Any
    state: str
    attempts: int
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    result: Any = None
    error: str | None = None
    daemon: str | None = None  # the daemon that ran the latest attempt
    max_attempts: int = 1
    run_at: int | None = None  # when a scheduled job is due
    cancel_requested: bool = False
    history: tuple[dict[str, Any], ...] = ()  # one entry per finished attempt
    waited_ms: int = 0  # set by a claim: how long this attempt waited since it was due
    idempotency_key: str | None = None
    progress: tuple[float, str, int] | None = None  # value, message, when (epoch ms)
    callback_url: str | None = None  # POSTed the final record when the job ends
    priority: int = DEFAULT_PRIORITY  # 0 to 9: of a queue's ready jobs, the highest start first
    waiting_for: str | None = None  # "rate_limit" or "concurrency": why a ready job waits
    # Attempts before the latest retry by hand (POST /jobs/ID/retry), which starts
    # `attempts` again from 0: see attempt_number.
    earlier_attempts: int = 0
    # The trace context its attempts continue (taskd.tracing): a W3C traceparent, then a
    # space and the tracestate, if any. None: submitted with tracing off.
    trace: str | None = None

    @property
    def attempt_number(self) -> int:
        """The attempts this job has had in all, retries by hand or not: while it runs, the
        number of this attempt; once it ended, of the attempt that ended it (or of the last
        before it was cancelled)."""
        return self.earlier_attempts + self.attempts

    def to_public(self) -> dict[str, Any]:
        """The job as the HTTP API shows it: RFC 3339 times, nothing internal."""
        return {
            "id": self.id,
            "type": self.type,
            "queue": self.queue,
            "state": self.state,
            "payload": self.payload,
            "attempts": self.attempts,
            "created_at": format_ms(self.created_at),
            "started_at": format_ms(self.started_at),
            "finished_at": format_ms(self.finished_at),
            "result": self.result,
            "error": self.error,
            "daemon": self.daemon,
            "max_attempts": self.max_attempts,
            "run_at": format_ms(self.run_at),
            "cancel_requested": self.cancel_requested,
            "idempotency_key": self.idempotency_key,
            "callback_url": self.callback_url,
            "priority": self.priority,
            "waiting_for": self.waiting_for,
            "progress": None
            if self.progress is None
            else {
                "value": self.progress[0],
                "message": self.progress[1],
                "at": format_ms(self.progress[2]),
            },
            "history": [_public_entry(entry) for entry in self.history],
        }


def _public_entry(entry: dict[str, Any]) -> dict[str, Any]:
    times = ("started_at", "finished_at")
    return {k: format_ms(v) if k in times else v for k, v in entry.items()}


def format_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as an RFC 3339 UTC time with milliseconds."""
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return f"{_format_second(seconds)}.{millis:03d}Z"


# Every answer about a job formats its times, and under load most fall in the same few
# seconds: a datetime per call took 3% of the intake's CPU.
@functools.lru_cache(maxsize=256)
def _format_second(seconds: int) -> str:
    """Epoch seconds as RFC 3339 UTC, to the second and without the offset."""
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None).isoformat()


def now_ms() -> int:
    """The wall clock in epoch milliseconds (what job timestamps use)."""
    return time.time_ns() // 1_000_000


class _IdGenerator:
    """UUIDv7 ids (RFC 9562): time-ordered, so ids sort by creation time.

    Within one millisecond the 12-bit sequence field counts up, so ids made by
    one process stay strictly increasing; the 62 random bits keep ids of
    different daemons apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._seq = 0
        # Random bytes, read RANDOM_POOL at a time (a system call each), 8 per id; a
        # forked child reads its own.
        self._random = b""
        self._taken = 0
        os.register_at_fork(after_in_child=self._forget_random)

    def __call__(self) -> str:
        with self._lock:
            ms = now_ms()
            if ms <= self._last_ms:
                self._seq += 1
                if self._seq > 0xFFF:  # sequence exhausted: borrow the next millisecond
                    self._last_ms += 1
                    self._seq = 0
                ms = self._last_ms
            else:
                self._last_ms, self._seq = ms, 0
            seq = self._seq
            if self._taken >= len(self._random):
                self._random, self._taken = os.urandom(RANDOM_POOL), 0
            rand = int.from_bytes(self._random[self._taken : self._taken + 8], "big")
            self._taken += 8
        rand &= (1 << 62) - 1
        value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
        h = f"{value:032x}"
        return "-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))

    def _forget_random(self) -> None:
        self._random, self._taken = b"", 0


new_id = _IdGenerator()
