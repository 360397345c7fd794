"""Timeouts of many keys on few timers: one loop timer per distinct number of seconds."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class _Line(Generic[K]):
    """The keys of one timeout, in the order they are due, and the timer of the first."""

    __slots__ = ("due", "timer")

    def __init__(self) -> None:
        self.due: OrderedDict[K, float] = OrderedDict()
        self.timer: asyncio.TimerHandle | None = None


class Timeouts(Generic[K]):
    """Calls `expire(key)` for each key started and not ended within its seconds.

    For job attempts (the worker pool) and HTTP requests (the API's Redis deadline): a
    timer each (call_at, then cancel) cost a tenth of a short job's run, and 7% of the
    intake's CPU. But keys with the same timeout fall due in the order they started, so
    each timeout keeps its keys in one ordered dict (O(1) to add and to drop when they
    end) and one timer, at the first one's due time; when it fires, it expires what is
    due and moves on to the next. A line's timer fires about once per timeout while keys
    flow. Use it from one event loop.
    """

    def __init__(self, *, expire: Callable[[K], None]) -> None:
        self._expire = expire
        self._lines: dict[float, _Line[K]] = {}
        # Kept: asyncio.get_running_loop() makes a system call (getpid) on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, key: K, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        line = self._lines.get(seconds)
        if line is None:
            line = self._lines[seconds] = _Line[K]()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        due = loop.time() + seconds
        line.due[key] = due
        if line.timer is None:
            line.timer = loop.call_at(due, self._fire, line)

    def end(self, key: K, seconds: float) -> None:
        """`key` ended in time (or was expired): forget it. Its line's timer stays: when
        it fires, it finds the next attempt due."""
        line = self._lines.get(seconds)
        if line is not None:
            line.due.pop(key, None)

    def close(self) -> None:
        """Cancel every timer: nothing expires after this."""
        for line in self._lines.values():
            if line.timer is not None:
                line.timer.cancel()
        self._lines.clear()

    def _fire(self, line: _Line[K]) -> None:
        loop = self._loop
        assert loop is not None  # set by the start() that armed this timer
        now = loop.time()
        line.timer = None
        while line.due:
            key, due = next(iter(line.due.items()))
            if due > now:
                line.timer = loop.call_at(due, self._fire, line)
                return
            del line.due[key]
            self._expire(key)
