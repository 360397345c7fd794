"""The acker: records the outcomes of finished jobs in Redis, many per script call."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

import anyio

from taskd.loop import Outage, repeat
from taskd.store import Attempt, Store

logger = logging.getLogger(__name__)

# Most outcomes recorded by one script call: bounds how long the script blocks Redis.
ACK_BATCH = 500
# Pause after a failed ack (Redis down); the outcomes wait and are sent again.
RETRY_DELAY = 0.5


class _Pending:
    """An outcome waiting to be recorded, and whether it was once sent."""

    __slots__ = ("attempt", "done", "queue", "recorded")

    def __init__(self, queue: str, attempt: Attempt) -> None:
        self.queue = queue
        self.attempt = attempt
        self.done = anyio.Event()
        self.recorded = False


class Acker:
    """Groups outcomes that arrive while a previous ack is on the wire.

    Under load, many jobs finish during one round trip; sending them together makes
    the cost per job one script call divided by the batch, not one call each. When
    idle, an outcome goes out at once.
    """

    def __init__(
        self,
        *,
        store: Store,
        daemon_id: str,
        clock: Callable[[], int],
        on_retry: Callable[[str, int], None] = lambda queue, due: None,
    ) -> None:
        self._store = store
        self._daemon_id = daemon_id
        self._clock = clock
        self._on_retry = on_retry
        self._pending: list[_Pending] = []
        self._has_work = anyio.Event()

    async def record(self, queue: str, attempt: Attempt) -> bool:
        """Queue one attempt's outcome and wait until Redis has it; False if Redis dropped
        it, the job having been taken back from this daemon meanwhile."""
        pending = _Pending(queue, attempt)
        self._pending.append(pending)
        self._has_work.set()
        await pending.done.wait()
        return pending.recorded

    async def tick(self) -> int:
        """Send one batch of pending outcomes; returns how many were sent."""
        batch, self._pending = self._pending[:ACK_BATCH], self._pending[ACK_BATCH:]
        by_queue: dict[str, list[_Pending]] = defaultdict(list)
        for item in batch:
            by_queue[item.queue].append(item)
        sent = 0
        try:
            for queue, items in by_queue.items():
                await self._send(queue, items)
                sent += len(items)
        except BaseException:
            # Keep what was not sent, in order, for the next attempt.
            unsent = [item for items in by_queue.values() for item in items][sent:]
            self._pending[:0] = unsent
            raise
        return sent

    async def run(self) -> None:
        """Send outcomes as they arrive, until cancelled."""
        outage = Outage("recording job outcomes", logger)
        await repeat(self._send_pending, outage=outage, retry_delay=RETRY_DELAY)

    async def _send_pending(self) -> None:
        if not self._pending:
            self._has_work = anyio.Event()
            await self._has_work.wait()
        await self.tick()

    async def flush(self) -> None:
        """Send everything pending, retrying through errors (bounded by the caller)."""
        while self._pending:
            try:
                await self.tick()
            except Exception:
                logger.warning("recording job outcomes failed at shutdown; retrying")
                await anyio.sleep(RETRY_DELAY)

    async def _send(self, queue: str, items: list[_Pending]) -> None:
        attempts = [item.attempt for item in items]
        flags = await self._store.ack(queue, self._daemon_id, attempts, self._clock())
        if not all(flags):
            # The missing ones were taken back while they ran (this daemon was taken for
            # dead); a newer attempt owns their record now.
            logger.warning(
                "%d finished jobs of queue %s were no longer this daemon's; outcome dropped",
                flags.count(False),
                queue,
            )
        for item, recorded in zip(items, flags, strict=True):
            item.recorded = recorded
            if recorded and item.attempt.outcome == "retry":
                self._on_retry(queue, item.attempt.retry_at)
            item.done.set()
