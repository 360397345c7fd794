"""Progress reports: what a running Python handler can tell about how far it got."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

# The reporter of the job this task runs; the worker pool sets it around each attempt.
_reporter: ContextVar[Callable[[float, str], Awaitable[None]] | None] = ContextVar(
    "taskd_progress_reporter", default=None
)
MAX_MESSAGE = 200


async def report_progress(value: float, message: str = "") -> None:
    """Record how far the running job got (e.g. a percentage) and a short message.

    GET /jobs/ID and the dashboard show the latest report while the job runs, and keep it
    afterwards. Each call is one Redis round trip: report at human pace, not per item.
    Outside a running job it does nothing. A sync handler (which runs in a worker thread)
    calls it as `anyio.from_thread.run(report_progress, value, message)`.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"progress must be a finite number, got {value!r}")
    reporter = _reporter.get()
    if reporter is not None:
        await reporter(float(value), str(message)[:MAX_MESSAGE])


def set_reporter(reporter: Callable[[float, str], Awaitable[None]]) -> None:
    """Make `report_progress` in this task (and tasks and threads it starts) use `reporter`."""
    _reporter.set(reporter)
