"""The janitor deletes finished jobs once their retention is over, so Redis stays bounded,
and frees jobs held for a global_concurrency that was removed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

import anyio

from taskd.config import RetentionConfig
from taskd.jobs import CANCELLED, COMPLETED, FAILED, now_ms
from taskd.loop import Outage, repeat
from taskd.store import Store

logger = logging.getLogger(__name__)

INTERVAL = 10.0


class Janitor:
    """Every INTERVAL seconds, trims the completed, failed and cancelled jobs of every queue,
    and returns to the ready jobs those held for a job type in `unlimited`: types this
    daemon has no global_concurrency for (any held are from before the limit was removed,
    and nothing else would free them)."""

    def __init__(
        self,
        *,
        store: Store,
        queues: Collection[str],
        retention: RetentionConfig,
        unlimited: Sequence[str] = (),
        clock: Callable[[], int] = now_ms,
        interval: float = INTERVAL,
    ) -> None:
        self._store = store
        self._queues = frozenset(queues)
        self._unlimited = tuple(unlimited)
        self._keep_ms = {
            COMPLETED: int(retention.completed * 1000),
            CANCELLED: int(retention.completed * 1000),
            FAILED: int(retention.failed * 1000),
        }
        self._clock = clock
        self._interval = interval

    async def tick(self) -> int:
        """Delete what has expired; returns how many jobs were deleted."""
        deleted = 0
        for queue in sorted(self._queues | await self._store.known_queues()):
            for state, keep in self._keep_ms.items():
                deleted += await self._store.trim(queue, state, self._clock() - keep)
            await self._store.trim_throughput(queue, self._clock())
            freed = await self._store.free_held(queue, self._unlimited)
            if freed:
                logger.info("freed %d jobs held for a global_concurrency now removed", freed)
        if deleted:
            logger.debug("deleted %d expired jobs", deleted)
        return deleted

    async def run(self) -> None:
        """Trim until cancelled."""
        outage = Outage("deleting expired jobs", logger)
        await repeat(self._trim_then_wait, outage=outage, retry_delay=self._interval)

    async def _trim_then_wait(self) -> None:
        await self.tick()
        await anyio.sleep(self._interval)
