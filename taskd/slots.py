"""The worker pool's job slots: how many are free, and which queue's fetcher gets them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anyio

from taskd.config import QUEUE_MODES


class _Queue:
    """The arbiter's view of one queue's fetcher."""

    __slots__ = ("credit", "granted", "idle", "wakeup", "weight")

    def __init__(self, weight: int) -> None:
        self.weight = weight
        self.credit = 0  # smooth weighted round-robin: the pick goes to the largest
        self.granted = 0  # slots handed to it that its acquire() has not taken yet
        # Its last claim got fewer jobs than slots: the queue is empty (its fetcher blocks
        # for an arrival) or paused. Unknown until its first claim, so not idle at first.
        self.idle = False
        self.wakeup: anyio.Event | None = None  # set while its fetcher waits in acquire()


class SlotArbiter:
    """Hands the `capacity` slots of a pool to the fetchers of `queues`, `batch` at most.

    A queue that is not idle (its fetcher waits for slots or is claiming) contends for
    free slots. Slots picked for a queue that is still claiming are kept for it and taken
    by its next acquire(), so its share does not depend on how long a claim takes.

    - strict: the first queue in `queues` that is not idle gets every free slot; the
      queues after it get none, so a later queue waits while an earlier one has work.
    - weighted: each free slot goes to one contending queue by smooth weighted
      round-robin (as nginx balances upstreams), so starts follow `weights` (default 1)
      and no queue starves.
    """

    def __init__(
        self,
        *,
        capacity: int,
        queues: Sequence[str],
        batch: int,
        mode: str = "weighted",
        weights: Mapping[str, int] | None = None,
    ) -> None:
        if mode not in QUEUE_MODES:
            raise ValueError(f"queue mode must be one of {', '.join(QUEUE_MODES)}, got {mode!r}")
        weights = weights or {}
        self._capacity = capacity
        self._free = capacity
        self._batch = batch
        self._strict = mode == "strict"
        self._queues = {queue: _Queue(weights.get(queue, 1)) for queue in queues}
        self._order = tuple(self._queues.values())

    @property
    def active(self) -> int:
        """Slots not free: held by running jobs, by claims, or kept for a claiming queue."""
        return self._capacity - self._free

    async def acquire(self, queue: str) -> int:
        """Wait until slots are handed to `queue`; returns how many, from 1 to `batch`."""
        q = self._queues[queue]
        q.idle = False
        self._dispatch()
        try:
            # A loop, not one wait: strict mode may take back slots handed to it before
            # this task ran again.
            while q.granted == 0:
                q.wakeup = anyio.Event()
                await q.wakeup.wait()
        except BaseException:
            # Cancelled (the pool drains): nothing will claim for this queue, so the
            # slots handed to it must not stay counted as active.
            self._take_back(q, idle=True)
            raise
        finally:
            q.wakeup = None
        granted, q.granted = q.granted, 0
        return granted

    def settle(self, queue: str, unused: int, *, idle: bool) -> None:
        """End a claim: give back its `unused` slots; `idle` when the queue ran dry.

        A dry (or paused, or failing) queue stops contending until its fetcher asks
        again, so the slots kept for it meanwhile go back too.
        """
        q = self._queues[queue]
        self._free += unused
        self._take_back(q, idle=idle)

    def alone(self, queue: str) -> bool:
        """Whether `queue` contends for slots and no other queue does: every slot freed
        would be handed to it."""
        q = self._queues[queue]
        return not q.idle and all(other.idle for other in self._order if other is not q)

    def take(self, count: int) -> None:
        """Use `count` slots at once, for jobs that take the slots of jobs about to be
        released (a claim sent with their ack): for that moment more slots are in use
        than there are, never once the releases that follow have run."""
        self._free -= count

    def release(self, count: int = 1) -> None:
        """Free `count` slots: a job ended."""
        self._free += count
        self._dispatch()

    def _take_back(self, q: _Queue, *, idle: bool) -> None:
        q.idle = idle
        if idle:
            self._free += q.granted
            q.granted = 0
        # Also when nothing came back: the queue going idle may unblock the next one.
        self._dispatch()

    def _dispatch(self) -> None:
        if self._strict:
            self._dispatch_strict()
        else:
            self._dispatch_weighted()

    def _dispatch_strict(self) -> None:
        for i, q in enumerate(self._order):
            if q.idle:
                continue
            for later in self._order[i + 1 :]:
                # Kept for a later queue, but an earlier one has work again: theirs now.
                self._free += later.granted
                later.granted = 0
            self._grant(q, self._free)
            return

    def _dispatch_weighted(self) -> None:
        while self._free > 0:
            contenders = [q for q in self._order if not q.idle and q.granted < self._batch]
            if len(contenders) <= 1:
                # Alone it would win every pick; its credit stays as it is either way.
                if contenders:
                    self._grant(contenders[0], self._free)
                return
            self._grant(self._pick(contenders), 1)

    @staticmethod
    def _pick(contenders: list[_Queue]) -> _Queue:
        """Smooth weighted round-robin: picks interleave, and follow the weights exactly."""
        total = 0
        best = contenders[0]
        for q in contenders:
            q.credit += q.weight
            total += q.weight
            if q.credit > best.credit:
                best = q
        best.credit -= total
        return best

    def _grant(self, q: _Queue, count: int) -> None:
        count = min(count, self._batch - q.granted)
        if count <= 0:
            return
        q.granted += count
        self._free -= count
        if q.wakeup is not None:
            q.wakeup.set()
