"""Python job handlers that the handler tests name in their configs."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import anyio

from taskd.handlers import JobFailed
from taskd.jobs import Job
from taskd.progress import report_progress


async def add(job: Job) -> dict[str, Any]:
    return {"sum": job.payload["a"] + job.payload["b"]}


def where_am_i(job: Job) -> dict[str, Any]:
    """Sync: reports whether it ran off the event loop's thread."""
    return {"in_worker_thread": threading.current_thread() is not threading.main_thread()}


async def explode(job: Job) -> None:
    raise ValueError("bad input")


def explode_sync(job: Job) -> None:
    raise KeyError("missing")


async def own_timeout(job: Job) -> None:
    raise TimeoutError("upstream took too long")


async def fail_cleanly(job: Job) -> None:
    raise JobFailed("a message of the handler's own")


async def not_json(job: Job) -> object:
    return object()


class Gauge:
    """How many `gated` runs are inside at once, and the most there ever were."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.gate = anyio.Event()


GAUGE = Gauge()


def reset_gauge() -> Gauge:
    global GAUGE
    GAUGE = Gauge()
    return GAUGE


async def gated(job: Job) -> Any:
    """Count itself in, wait for the test to open the gate, then return the payload."""
    gauge = GAUGE
    gauge.running += 1
    gauge.peak = max(gauge.peak, gauge.running)
    try:
        await gauge.gate.wait()
    finally:
        gauge.running -= 1
    return job.payload


RELEASE = threading.Event()


def blocking(job: Job) -> str:
    """Sync and uninterruptible: blocks its thread until the test sets RELEASE."""
    RELEASE.wait(timeout=60)
    return "released"


TRACKER = Gauge()


async def tracked(job: Job) -> None:
    """Count itself in while it sleeps `payload` seconds (the worker-pool tests read it)."""
    TRACKER.running += 1
    TRACKER.peak = max(TRACKER.peak, TRACKER.running)
    try:
        await anyio.sleep(job.payload)
    finally:
        TRACKER.running -= 1


async def record(job: Job) -> None:
    """Append the job id to the file $TASKD_TEST_RECORD, then sleep `payload` seconds.

    Chaos tests count executions from these files: one line per started attempt, written
    with O_APPEND so lines of concurrent jobs never interleave.
    """
    fd = os.open(os.environ["TASKD_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{job.id}\n".encode())
    finally:
        os.close(fd)
    await anyio.sleep(job.payload)


PROGRESS_GATE = Gauge()


async def progressing(job: Job) -> str:
    """Report half the work done, then wait for the test to open the gate."""
    await report_progress(50, "halfway there")
    await PROGRESS_GATE.gate.wait()
    await report_progress(100, "done")
    return "finished"


async def reports_then_returns(job: Job) -> Any:
    """Report progress once, then return the payload: a finished job that has progress."""
    await report_progress(100, "done")
    return job.payload


class Run:
    """One run of `stepped`: the test sets `go` to let it report again and finish."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.go = anyio.Event()
        self.reported = anyio.Event()


RUNS: list[Run] = []


async def stepped(job: Job) -> int:
    """Report 'run N started', wait for the test's go, report 'run N finishing', return N.

    N counts the runs of every job since the test cleared RUNS, so the reports of two
    attempts of one job (on two daemons of this process) tell which attempt made them.
    """
    run = Run(job.id)
    number = len(RUNS)
    RUNS.append(run)
    await report_progress(number, f"run {number} started")
    await run.go.wait()
    await report_progress(100, f"run {number} finishing")
    run.reported.set()
    return number


async def stubborn(job: Job) -> None:
    """Swallow the first cancellation and go on sleeping: a handler that must still be cut
    short at its timeout."""
    with contextlib.suppress(BaseException):  # swallowing it is the point
        await anyio.sleep(60)
    await anyio.sleep(60)


async def traced(job: Job) -> dict[str, str]:
    """Makes a span of its own under the current one: their ids."""
    return _own_span()


def traced_sync(job: Job) -> dict[str, str]:
    """traced, in a worker thread."""
    return _own_span()


def _own_span() -> dict[str, str]:
    # Here, not at the top: the other tests, which import this module, run without tracing.
    from opentelemetry import trace

    with trace.get_tracer("tests").start_as_current_span("handler's own work") as span:
        ids = span.get_span_context()
        return {"trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}"}
