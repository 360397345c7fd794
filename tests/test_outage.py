"""The loops' shared error policy: one traceback per outage, a reminder a minute, an end."""

from __future__ import annotations

import logging

import pytest

from taskd.outage import Outage


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
