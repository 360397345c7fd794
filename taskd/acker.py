"""The acker: records the outcomes of finished jobs in Redis, many per script call."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

import anyio

from taskd.loop import Outage, repeat
from taskd.store import Attempt, Claimed, ClaimRequest, Store

logger = logging.getLogger(__name__)

# Most outcomes recorded by one script call: bounds how long the script blocks Redis.
ACK_BATCH = 500
# Pause after a failed ack (Redis down); the outcomes wait and are sent again.
RETRY_DELAY = 0.5


class Acker:
    """Groups outcomes that arrive while a previous ack is on the wire.

    Under load, many jobs finish during one round trip; sending them together makes
    the cost per job one script call divided by the batch, not one call each. When
    idle, an outcome goes out at once. Nobody waits for an outcome: record() queues it
    and returns, and the acker calls `on_recorded` once Redis has answered, so no task
    or event is kept per job meanwhile (see WorkerPool). With an ack goes the claim of
    the jobs to take the slots it frees, when the pool plans one (`plan_claim`): one
    round trip a cycle instead of two.
    """

    def __init__(
        self,
        *,
        store: Store,
        daemon_id: str,
        clock: Callable[[], int],
        on_retry: Callable[[str, int], None] = lambda queue, due: None,
        on_recorded: Callable[[Attempt, bool], None] = lambda attempt, recorded: None,
        plan_claim: Callable[[str, list[Attempt]], ClaimRequest | None] = lambda q, a: None,
        on_claimed: Callable[[str, ClaimRequest, Claimed | None], None] = lambda q, r, c: None,
    ) -> None:
        """`plan_claim(queue, attempts)`: a claim to send with the ack of these attempts,
        in the same round trip (Store.ack_and_claim), or None; `on_claimed(queue, request,
        claimed)` then gets what it claimed, before `on_recorded` hears of the attempts
        (the claim takes the slots they free), or None if the call failed."""
        self._plan_claim = plan_claim
        self._on_claimed = on_claimed
        self._store = store
        self._daemon_id = daemon_id
        self._clock = clock
        self._on_retry = on_retry
        self._on_recorded = on_recorded
        # (queue, outcome) in the order they came.
        self._pending: list[tuple[str, Attempt]] = []
        self._failing = False  # the last send failed (see _send)
        self._sending_lock = anyio.Lock()
        self._has_work = anyio.Event()

    def record(self, queue: str, attempt: Attempt) -> None:
        """Queue one attempt's outcome; `on_recorded(attempt, recorded)` is called once
        Redis has it: False if Redis dropped it, the job having been taken back from this
        daemon meanwhile. Outcomes are sent until Redis answers, through outages."""
        self._pending.append((queue, attempt))
        self._has_work.set()

    async def tick(self) -> int:
        """Send one batch of pending outcomes; returns how many were sent."""
        # One batch on the wire at a time: flush() at shutdown must not return while
        # run()'s batch is still out, lest the final requeue take back its jobs.
        async with self._sending_lock:
            return await self._tick()

    async def _tick(self) -> int:
        batch, self._pending = self._pending[:ACK_BATCH], self._pending[ACK_BATCH:]
        by_queue: dict[str, list[Attempt]] = defaultdict(list)
        for queue, attempt in batch:
            by_queue[queue].append(attempt)
        sent = 0
        try:
            for queue, attempts in by_queue.items():
                flags = await self._send(queue, attempts)
                sent += len(attempts)
                self._report(queue, attempts, flags)
        except BaseException:
            # Keep what was not sent, in order, for the next attempt.
            unsent = [(q, a) for q, attempts in by_queue.items() for a in attempts][sent:]
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
        """Send everything pending, retrying through errors (bounded by the caller); a
        batch already on the wire is waited for first."""
        while True:
            try:
                await self.tick()
            except Exception:
                logger.warning("recording job outcomes failed at shutdown; retrying")
                await anyio.sleep(RETRY_DELAY)
                continue
            if not self._pending:
                return

    async def _send(self, queue: str, attempts: list[Attempt]) -> list[bool]:
        # No claim with an ack sent again after a failure: one that ran each time while
        # the ack kept failing would take more jobs than the slots the ack frees.
        request = None if self._failing else self._plan_claim(queue, attempts)
        self._failing = True  # until this send answers
        if request is None:
            flags = await self._store.ack(queue, self._daemon_id, attempts, self._clock())
        else:
            try:
                flags, claimed = await self._store.ack_and_claim(
                    queue, self._daemon_id, attempts, request
                )
            except BaseException:
                self._on_claimed(queue, request, None)
                raise
            if isinstance(claimed, Exception):
                # The ack is recorded; the jobs the claim may have taken are orphans that
                # the pool's orphan release returns.
                logger.warning("the claim sent with an ack of queue %s failed: %s", queue, claimed)
                self._on_claimed(queue, request, None)
            else:
                self._on_claimed(queue, request, claimed)
        self._failing = False
        if not all(flags):
            # The missing ones were taken back while they ran (this daemon was taken for
            # dead); a newer attempt owns their record now.
            logger.warning(
                "%d finished jobs of queue %s were no longer this daemon's; outcome dropped",
                flags.count(False),
                queue,
            )
        return flags

    def _report(self, queue: str, attempts: list[Attempt], flags: list[bool]) -> None:
        """Tell what Redis answered; a failing listener must not have the batch sent again."""
        for attempt, recorded in zip(attempts, flags, strict=True):
            try:
                if recorded and attempt.outcome == "retry":
                    self._on_retry(queue, attempt.retry_at)
                self._on_recorded(attempt, recorded)
            except Exception:
                logger.exception("handling the recorded outcome of job %s failed", attempt.job_id)
