"""The loop the cooperating tasks share, and its error policy: one traceback per outage,
a reminder a minute, an end."""

from __future__ import annotations

import asyncio
import logging

import anyio
import anyio.lowlevel
import pytest

from taskd.loop import Outage, repeat


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_logs_one_traceback_then_a_reminder_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    outage = Outage("promoting due jobs", logging.getLogger("taskd.test"), clock=clock)
    for _ in range(480):  # four minutes of failures, two a second
        outage.failed(ConnectionError("Connection refused"))
        clock.now += 0.5
    outage.ok()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.exc_info is not None for r in warnings] == [True, False, False, False]
    assert warnings[0].getMessage() == "promoting due jobs failed; retrying"
    assert warnings[1].getMessage() == (
        "promoting due jobs still failing after 60 s (121 tries): "
        "ConnectionError: Connection refused"
    )
    [over] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert over.getMessage() == "promoting due jobs works again, after 240 s and 480 failures"


def test_a_new_outage_gets_its_traceback_again(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage("the heartbeat", logging.getLogger("taskd.test"), clock=Clock())
    outage.ok()  # nothing to say while all is well
    assert caplog.records == []
    for _ in range(2):
        outage.failed(TimeoutError())
        outage.ok()
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 2
    assert outage.failures == 0


async def test_repeat_carries_on_through_failures_and_says_when_they_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    passes: list[int] = []
    enough = anyio.Event()

    async def step() -> None:
        passes.append(len(passes))
        if len(passes) <= 3:
            raise ConnectionError("Connection refused")
        if len(passes) == 5:
            enough.set()
        await anyio.lowlevel.checkpoint()

    outage = Outage("promoting due jobs", logging.getLogger("taskd.test"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: repeat(step, outage=outage, retry_delay=0.001))
        with anyio.fail_after(10):
            await enough.wait()
        tg.cancel_scope.cancel()
    assert len(passes) >= 5
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert [r.getMessage() for r in tracebacks] == ["promoting due jobs failed; retrying"]
    assert "promoting due jobs works again, after 0 s and 3 failures" in caplog.messages


async def test_repeat_ends_at_once_when_cancelled_even_while_retrying() -> None:
    failed = asyncio.Event()

    async def failing() -> None:
        failed.set()
        raise TimeoutError

    outage = Outage("the heartbeat", logging.getLogger("taskd.test"))
    task = asyncio.ensure_future(repeat(failing, outage=outage, retry_delay=3600))
    await asyncio.wait_for(failed.wait(), timeout=5)
    assert outage.failures == 1  # the same step that failed began the hour-long wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
