"""The promoter moves delayed and retry-waiting jobs to their queue when they fall due."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio

from taskd.jobs import now_ms
from taskd.loop import Outage, repeat
from taskd.store import Store

logger = logging.getLogger(__name__)

# Longest sleep between passes. Jobs scheduled through this daemon wake it precisely;
# this bounds the delay for jobs scheduled through other daemons, and for a Redis outage.
MAX_SLEEP = 1.0
RETRY_DELAY = 0.5


class Promoter:
    """Sleeps until the next due job of its queues (or MAX_SLEEP), then promotes."""

    def __init__(
        self, *, store: Store, queues: Sequence[str], clock: Callable[[], int] = now_ms
    ) -> None:
        self._store = store
        self._queues = tuple(queues)
        self._clock = clock
        self._wake_at: float = float("inf")
        self._woken = anyio.Event()

    def wake(self, queue: str, due: int) -> None:
        """A job of `queue` falls due at `due` (epoch ms): be awake by then."""
        if queue in self._queues and due < self._wake_at:
            self._woken.set()

    async def tick(self) -> int | None:
        """Promote every due job once; returns when the next one falls due (epoch ms)."""
        next_due: int | None = None
        for queue in self._queues:
            while True:
                moved, due = await self._store.promote(queue, self._clock())
                if moved:
                    logger.debug("promoted %d due jobs of queue %s", moved, queue)
                # A full batch may leave more that are due right now.
                if due is None or due > self._clock():
                    break
            if due is not None and (next_due is None or due < next_due):
                next_due = due
        return next_due

    async def run(self) -> None:
        """Promote until cancelled."""
        outage = Outage("promoting due jobs", logger)
        await repeat(self._promote_then_wait, outage=outage, retry_delay=RETRY_DELAY)

    async def _promote_then_wait(self) -> None:
        # A new event before the pass: a wake() during it is not lost.
        self._woken = anyio.Event()
        next_due = await self.tick()
        delay = MAX_SLEEP
        if next_due is not None:
            delay = min(MAX_SLEEP, max(0.0, (next_due - self._clock()) / 1000))
        self._wake_at = self._clock() + delay * 1000
        with anyio.move_on_after(delay):
            await self._woken.wait()
        self._wake_at = float("inf")
