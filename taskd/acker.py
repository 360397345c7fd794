"""The acker: records the outcomes of finished jobs in Redis, many per script call."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import anyio

from taskd.loop import Outage, repeat
from taskd.store import Attempt, Claimed, ClaimRequest, Store

logger = logging.getLogger(__name__)

# Most outcomes recorded by one script call: bounds how long the script blocks Redis.
ACK_BATCH = 500
# Acknowledgements on the wire at once (see Acker).
LANES = 2
# Fewest outcomes in each half of a batch split between the lanes: below that, the fixed
# cost of a script call in Redis outweighs what the overlap saves.
LANE_MIN = 16
# Pause after a failed ack (Redis down); the outcomes wait and are sent again.
RETRY_DELAY = 0.5

_Pending = list[tuple[str, Attempt]]


class Acker:
    """Groups outcomes that arrive while a previous ack is on the wire.

    Under load, many jobs finish during one round trip; sending them together makes
    the cost per job one script call divided by the batch, not one call each. When
    idle, an outcome goes out at once. Nobody waits for an outcome: record() queues it
    and returns, and the acker calls `on_recorded` once Redis has answered, so no task
    or event is kept per job meanwhile (see WorkerPool). With an ack goes the claim of
    the jobs to take the slots it frees, when the pool plans one (`plan_claim`): one
    round trip a cycle instead of two.

    Two acks may be on the wire at once (LANES), so that Redis records one batch and
    claims the jobs for its slots while the daemon runs the jobs of the other: with one,
    the two took turns, each idle while the other worked. When every job the daemon holds
    (`holding`) waits for its ack and none is on the wire, as after a drain's first
    claim, the batch is split in two halves, one a lane; from then on each half's jobs
    end while the other half's ack is out, and go together. A second ack goes out only
    for at least half the jobs held, so that jobs ending one by one are not sent in
    twice the calls, each with its fixed cost in Redis: they wait for the ack on the
    wire, as with one lane. Each ack claims only for the slots it frees, so a daemon
    still never holds more jobs in Redis than slots.
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
        holding: Callable[[], int] = lambda: 0,
    ) -> None:
        """`plan_claim(queue, attempts)`: a claim to send with the ack of these attempts,
        in the same round trip (Store.ack_and_claim), or None; `on_claimed(queue, request,
        claimed)` then gets what it claimed, before `on_recorded` hears of the attempts
        (the claim takes the slots they free), or None if the call failed. `holding()`:
        the jobs the daemon holds (running or waiting for their ack)."""
        self._plan_claim = plan_claim
        self._on_claimed = on_claimed
        self._holding = holding
        self._store = store
        self._daemon_id = daemon_id
        self._clock = clock
        self._on_retry = on_retry
        self._on_recorded = on_recorded
        # (queue, outcome) in the order they came.
        self._pending: _Pending = []
        self._on_wire = 0  # batches sent and not answered yet
        # A send failed, and none begun since has answered (see _send).
        self._failing = False
        self._failures = 0
        # Attempts (job id, attempt) put back by a failed send, until sent again (_send).
        self._resent: set[tuple[str, int]] = set()
        # After a failed send no lane sends before this time (anyio's clock): the other
        # lane would otherwise send the outcomes again at once, not after RETRY_DELAY.
        self._hold_until = 0.0
        self._wait_s = math.inf  # how long an idle lane waits at most (see _take)
        # Set, and replaced, when an outcome is queued or a batch answers, if waited for.
        self._changed = anyio.Event()
        self._watched = False

    def record(self, queue: str, attempt: Attempt) -> None:
        """Queue one attempt's outcome; `on_recorded(attempt, recorded)` is called once
        Redis has it: False if Redis dropped it, the job having been taken back from this
        daemon meanwhile. Outcomes are sent until Redis answers, through outages."""
        self._pending.append((queue, attempt))
        self._notify()

    async def tick(self) -> int:
        """Send what is pending as one batch (up to ACK_BATCH), once no batch is on the
        wire; returns how many were sent."""
        # flush() at shutdown must not return while a lane's batch is still out, lest the
        # final requeue take back its jobs.
        while self._on_wire:
            await self._next_change()
        if not self._pending:
            return 0
        return await self._send_batch(self._take_first(ACK_BATCH))

    async def run(self) -> None:
        """Send outcomes as they arrive, LANES batches on the wire at most, until cancelled."""
        outage = Outage("recording job outcomes", logger)
        lane = partial(repeat, self._send_next, outage=outage, retry_delay=RETRY_DELAY)
        async with anyio.create_task_group() as tg:
            for _ in range(LANES):
                tg.start_soon(lane)

    async def flush(self) -> None:
        """Send everything pending, retrying through errors (bounded by the caller); the
        batches already on the wire are waited for first."""
        while True:
            try:
                await self.tick()
            except Exception:
                logger.warning("recording job outcomes failed at shutdown; retrying")
                await anyio.sleep(RETRY_DELAY)
                continue
            if not self._pending and not self._on_wire:
                return

    async def _send_next(self) -> None:
        """One lane's pass: wait for a batch it may send, and send it."""
        while (batch := self._take()) is None:
            with anyio.move_on_after(self._wait_s):
                await self._next_change()
        await self._send_batch(batch)

    def _take(self) -> _Pending | None:
        """The outcomes a lane sends now; None while there are none, every lane is out, or
        a second ack would carry too few (see Acker)."""
        self._wait_s = self._hold_until - anyio.current_time()
        if self._wait_s > 0:
            return None
        self._wait_s = math.inf
        pending = len(self._pending)
        if not pending or self._on_wire >= LANES:
            return None
        holding = self._holding()
        if not self._on_wire:
            split = pending >= holding and pending >= LANES * LANE_MIN
            size = -(-pending // LANES) if split else pending
        elif pending >= max(LANE_MIN, holding // LANES):
            size = pending
        else:
            return None
        return self._take_first(min(size, ACK_BATCH))

    def _take_first(self, size: int) -> _Pending:
        batch, self._pending = self._pending[:size], self._pending[size:]
        self._on_wire += 1
        return batch

    async def _send_batch(self, batch: _Pending) -> int:
        """Send a batch taken from the pending outcomes (one call a queue); returns how many
        were sent. What was not sent goes back to the front, in order."""
        by_queue: dict[str, list[Attempt]] = defaultdict(list)
        for queue, attempt in batch:
            by_queue[queue].append(attempt)
        sent = 0
        try:
            for queue, attempts in by_queue.items():
                flags = await self._send(queue, attempts)
                sent += len(attempts)
                self._report(queue, attempts, flags)
        except BaseException as exc:
            unsent = [(q, a) for q, attempts in by_queue.items() for a in attempts][sent:]
            self._pending[:0] = unsent
            self._resent.update((a.job_id, a.attempt) for _, a in unsent)
            if isinstance(exc, Exception):
                self._hold_until = anyio.current_time() + RETRY_DELAY
            raise
        finally:
            self._on_wire -= 1
            self._notify()  # a lane, or tick(), may go on
        return sent

    def _notify(self) -> None:
        if self._watched:
            self._watched = False
            self._changed.set()
            self._changed = anyio.Event()

    async def _next_change(self) -> None:
        """Wait until an outcome is queued or a batch answers."""
        self._watched = True
        await self._changed.wait()

    async def _send(self, queue: str, attempts: list[Attempt]) -> list[bool]:
        # No claim with an ack sent again after a failure: had the failed call run in
        # Redis, its claim took jobs for these slots already, and one each time the ack
        # kept failing would take more jobs than the slots free. Nor with any ack until one
        # begun after the failure has answered: Redis may still be failing.
        resent = bool(self._resent) and any((a.job_id, a.attempt) in self._resent for a in attempts)
        request = None if self._failing or resent else self._plan_claim(queue, attempts)
        failures = self._failures
        try:
            flags = await self._call(queue, attempts, request)
        except BaseException:
            self._failing = True
            self._failures += 1
            raise
        if resent:
            self._resent.difference_update((a.job_id, a.attempt) for a in attempts)
        if failures == self._failures:
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

    async def _call(
        self, queue: str, attempts: list[Attempt], request: ClaimRequest | None
    ) -> list[bool]:
        """The ack, with the claim `request` if any (its outcome told to on_claimed)."""
        if request is None:
            return await self._store.ack(queue, self._daemon_id, attempts, self._clock())
        try:
            flags, claimed = await self._store.ack_and_claim(
                queue, self._daemon_id, attempts, request
            )
        except BaseException:
            self._on_claimed(queue, request, None)
            raise
        if isinstance(claimed, Exception):
            # The ack is recorded; the jobs the claim may have taken are orphans that the
            # pool's orphan release returns.
            logger.warning("the claim sent with an ack of queue %s failed: %s", queue, claimed)
            self._on_claimed(queue, request, None)
        else:
            self._on_claimed(queue, request, claimed)
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
