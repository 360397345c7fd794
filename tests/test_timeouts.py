"""Attempt timeouts: each key expires at its own time, through one timer per timeout."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import anyio
import pytest

from taskd.timeouts import Timeouts
from tests.support import wait_until


async def test_keys_expire_in_order_at_their_own_time_unless_ended_first() -> None:
    expired: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()
    timeouts = Timeouts[str](expire=lambda key: expired.append((key, loop.time())))
    began = loop.time()
    timeouts.start("a", 0.2)
    timeouts.start("b", 0.2)
    await anyio.sleep(0.05)
    timeouts.start("c", 0.2)
    timeouts.start("quick", 0.05)
    timeouts.start("never", math.inf)
    timeouts.end("b", 0.2)  # ended in time
    await wait_until(lambda: _holds(len(expired) == 3), "3 keys expired")
    assert [key for key, _ in expired] == ["quick", "a", "c"]
    at = dict(expired)
    assert at["a"] - began >= 0.2
    assert at["c"] - began >= 0.25  # its own due time, not the first key's
    assert at["quick"] - began >= 0.1
    timeouts.close()


async def test_a_line_keeps_one_timer_however_many_keys_it_holds() -> None:
    loop = asyncio.get_running_loop()
    armed = 0
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal armed
        armed += 1
        return call_at(when, callback, *args, **kwargs)

    expired: list[int] = []
    timeouts = Timeouts[int](expire=expired.append)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "call_at", counting)
        for key in range(1000):
            timeouts.start(key, 0.05)
        for key in range(0, 1000, 2):
            timeouts.end(key, 0.05)
        await wait_until(lambda: _holds(len(expired) == 500), "500 keys expired")
    assert expired == list(range(1, 1000, 2))
    # The first key's timer, then one again each time it fired before the rest were due:
    # about one per ms the keys took to start (a few, or more on a loaded machine), far
    # from one per key.
    assert armed < 250
    timeouts.close()


async def test_nothing_expires_after_close() -> None:
    expired: list[str] = []
    timeouts = Timeouts[str](expire=expired.append)
    timeouts.start("a", 0.01)
    timeouts.close()
    await anyio.sleep(0.1)
    assert expired == []


async def _holds(value: bool) -> bool:
    return value
