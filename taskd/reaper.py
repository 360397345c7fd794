"""The reaper returns the in-flight jobs of dead daemons to their queues."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import anyio

from taskd.jobs import now_ms
from taskd.loop import Outage, repeat
from taskd.metrics import Metrics
from taskd.store import Store

logger = logging.getLogger(__name__)


class Reaper:
    """Every `interval` seconds, takes back the jobs of daemons silent for `dead_after`.

    Every live daemon runs one. They need no coordination: a daemon's jobs are taken
    back by one script that first checks its lease, so two reapers never take the same
    job, and a daemon that beat in the meantime keeps its jobs.
    """

    def __init__(
        self,
        *,
        store: Store,
        daemon_id: str,
        queues: Collection[str],
        interval: float,
        dead_after: float,
        metrics: Metrics,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._me = daemon_id
        self._queues = frozenset(queues)
        self._interval = interval
        self._dead_after_ms = int(dead_after * 1000)
        self._clock = clock

    async def tick(self) -> int:
        """One pass over every known queue; returns how many jobs were taken back."""
        before = self._clock() - self._dead_after_ms
        recovered = 0
        for queue in sorted(self._queues | await self._store.known_queues()):
            for owner in await self._store.stale_leases(queue, before):
                if owner == self._me:
                    continue  # we are alive; our own heartbeat renews the lease
                moved = await self._store.recover(queue, owner, self._clock(), before)
                if moved > 0:
                    logger.warning(
                        "daemon %s is dead: returned %d of its jobs of queue %s",
                        owner, moved, queue,
                    )  # fmt: skip
                    recovered += moved
                    self._metrics.recovered(queue, moved)
        for daemon_id in await self._store.stale_daemons(before):
            if daemon_id != self._me and await self._store.forget_daemon(daemon_id, before):
                logger.info("forgot dead daemon %s", daemon_id)
        return recovered

    async def run(self) -> None:
        """Reap until cancelled."""
        # The step waits first, so a failed pass is tried again one interval later.
        outage = Outage("reaping dead daemons", logger)
        await repeat(self._wait_then_reap, outage=outage, retry_delay=0)

    async def _wait_then_reap(self) -> None:
        await anyio.sleep(self._interval)
        await self.tick()
