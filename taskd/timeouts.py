"""Attempt timeouts: one loop timer per distinct timeout, however many jobs are in flight."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class _Line(Generic[K]):
    """The attempts of one timeout, in the order they are due, and the timer of the first."""

    __slots__ = ("due", "timer")

    def __init__(self) -> None:
        self.due: OrderedDict[K, float] = OrderedDict()
        self.timer: asyncio.TimerHandle | None = None


class Timeouts(Generic[K]):
    """Calls `expire(key)` for each key started and not ended within its seconds.

    A timer per attempt (call_at, then cancel) cost a tenth of a short job's run. But
    attempts with the same timeout fall due in the order they started, so each timeout
    keeps its attempts in one ordered dict (O(1) to add and to drop when they end) and
    one timer, at the first one's due time; when it fires, it expires what is due and
    moves on to the next. A line's timer fires about once per timeout while jobs flow.
    """

    def __init__(self, *, expire: Callable[[K], None]) -> None:
        self._expire = expire
        self._lines: dict[float, _Line[K]] = {}

    def start(self, key: K, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        line = self._lines.get(seconds)
        if line is None:
            line = self._lines[seconds] = _Line[K]()
        loop = asyncio.get_running_loop()
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
        loop = asyncio.get_running_loop()
        now = loop.time()
        line.timer = None
        while line.due:
            key, due = next(iter(line.due.items()))
            if due > now:
                line.timer = loop.call_at(due, self._fire, line)
                return
            del line.due[key]
            self._expire(key)
