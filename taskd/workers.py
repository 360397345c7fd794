"""The worker pool: fetches jobs of this daemon's queues, runs them, and acknowledges them."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from taskd.acker import Acker
from taskd.config import HandlerConfig
from taskd.handlers import Handlers, JobFailed
from taskd.jobs import FINAL_STATES, Job, now_ms
from taskd.loop import Outage, repeat
from taskd.metrics import Metrics
from taskd.progress import set_reporter
from taskd.slots import SlotArbiter
from taskd.store import Attempt, Claimed, ClaimRequest, Store, TypeLimits
from taskd.timeouts import Timeouts

if TYPE_CHECKING:  # opentelemetry, which it imports, is the optional otel extra
    from taskd.tracing import Tracing

logger = logging.getLogger(__name__)

# Most jobs claimed in one round trip: large enough to amortise the round trip under load,
# small enough that one script call stays short.
FETCH_BATCH = 1000
# How long a blocking fetch waits on an empty queue before it looks again. Arrivals end the
# wait at once; this only bounds how long a connection sits in one command.
BLOCK_TIMEOUT = 5
# Pause after a failed fetch (Redis down), so a dead Redis is not hammered.
FETCH_RETRY_DELAY = 0.5
# How often a paused queue is looked at again: the delay before a resume takes effect.
PAUSED_POLL = 0.5
# A claim that skipped ready jobs this daemon cannot start (no handler, or its handler's
# concurrency full) must not block on the queue, which those jobs keep non-empty: the
# fetcher waits for one of its own jobs to end, or looks again after a wait that doubles
# from SKIP_POLL_MIN to SKIP_POLL_MAX while nothing changes (the pick-up delay of other
# jobs while such a backlog stands at the head of the queue and no other daemon is idle).
SKIP_POLL_MIN = 0.05
SKIP_POLL_MAX = 1.0
# Outcomes that end a job (a retry does not).
FINAL_OUTCOMES = frozenset(FINAL_STATES)
# Longest the final requeue may take at shutdown; past it the reaper recovers the rest.
FINISH_TIMEOUT = 10.0
# Why a running job's attempt was cancelled (see _Running).
CANCELLED = "cancelled"
LOST = "lost"
STOPPED = "stopped"  # the pool stopped at shutdown: the job goes back to its queue
TIMED_OUT = "timed out"  # past its handler's timeout
# Seconds after which a cancelled attempt still running is cancelled again (see _Running).
RECANCEL_SECONDS = 1.0


def type_limits_of(job_type: str, config: HandlerConfig) -> TypeLimits:
    """A handler's limits across daemons, as claims enforce them."""
    rate = config.rate_limit
    return TypeLimits(
        job_type,
        concurrency=config.global_concurrency or 0,
        rate_count=rate.count if rate else 0,
        rate_per_ms=rate.per_ms if rate else 0,
    )


def _nothing(job: Job) -> None:
    pass


class WorkerPool:
    """Runs up to `concurrency` jobs at once, fetched from `queues`.

    Fetching is one task per queue, not one per slot: it claims as many ready jobs as
    there are free slots in one script call, and blocks (BLMOVE) only when the queue is
    empty, so connections stay few as concurrency grows and an idle daemon starts a new
    job the moment it arrives. Which queue's fetcher gets the free slots is up to
    `queue_mode` and `weights` (see taskd.slots). A claim takes only jobs that can start
    at once: of types this daemon has handlers for, and within each handler's
    `concurrency` here, so no job waits in this daemon for a slot of its own.

    Each job runs in a plain asyncio task (see _Running), not in an anyio task group or
    cancel scope, whose bookkeeping cost more than the rest of a short job's run. What
    the group would do for them, the pool does: it waits for its jobs when it stops, and
    cancels them at the deadline hurry() sets, or at once if the pool itself is
    cancelled.
    """

    def __init__(
        self,
        *,
        store: Store,
        handlers: Handlers,
        handler_configs: Mapping[str, HandlerConfig],
        daemon_id: str,
        queues: Sequence[str],
        concurrency: int,
        clock: Callable[[], int] = now_ms,
        fetch_batch: int = FETCH_BATCH,
        block_timeout: int = BLOCK_TIMEOUT,
        metrics: Metrics,
        on_retry: Callable[[str, int], None] = lambda queue, due: None,
        on_final: Callable[[Job], None] = _nothing,
        queue_mode: str = "weighted",
        weights: Mapping[str, int] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing  # None: off
        self._on_final = on_final
        self._on_retry = on_retry
        self._type_limits = [
            type_limits_of(name, config) for name, config in handler_configs.items()
        ]
        # Handler concurrency per type, and the jobs of those types this daemon holds now
        # (claimed until acked, like the pool's slots) or is offering a claim room for.
        self._caps = {
            name: config.concurrency
            for name, config in handler_configs.items()
            if config.concurrency is not None
        }
        self._taken = dict.fromkeys(self._caps, 0)
        # Set when a job ends, while a fetcher waits for that (see _a_job_ends).
        self._job_ended: anyio.Event | None = None
        self._store = store
        self._metrics = metrics
        self._handlers = handlers
        self._handler_configs = handler_configs
        self._python_types = {name for name, c in handler_configs.items() if c.kind == "python"}
        self._daemon_id = daemon_id
        self._queues = tuple(queues)
        self._clock = clock
        self._block_timeout = block_timeout
        self._slots = SlotArbiter(
            capacity=concurrency,
            queues=self._queues,
            batch=fetch_batch,
            mode=queue_mode,
            weights=weights,
        )
        self._acker = Acker(
            store=store,
            daemon_id=daemon_id,
            clock=clock,
            on_retry=on_retry,
            on_recorded=self._recorded,
            plan_claim=self._plan_claim,
            on_claimed=self._claimed_with_ack,
            holding=lambda: self._slots.active,
        )
        self._running: dict[str, _Running] = {}
        # The jobs whose attempt ended, by id and attempt, until the ack answers for them.
        self._acking: dict[tuple[str, int], _Running] = {}
        self._timeouts = Timeouts[_Running](expire=_timed_out)
        self._fetching = anyio.CancelScope()
        # Its deadline (hurry) ends fetching and the wait for the running jobs.
        self._grace = anyio.CancelScope()
        self._stopping = False  # past the grace: the running jobs are being stopped
        self._emptied = anyio.Event()  # set when the last running job ends
        self._stopped = anyio.Event()

    @property
    def active(self) -> int:
        """Slots in use: jobs running, being claimed, or waiting for their ack."""
        return self._slots.active

    async def tick(self, queue: str) -> Claimed:
        """One fetch pass: claim as many ready jobs as the queue is handed slots, start them."""
        wanted = await self._slots.acquire(queue)
        # Room offered to this claim is taken until it answers, so that a claim of another
        # queue meanwhile cannot be offered the same room.
        free = self._room()
        self._take_types(free, 1)
        try:
            claim = await self._store.claim(
                queue, self._daemon_id, wanted, self._clock(), self._type_limits, free
            )
        except BaseException:
            self._slots.settle(queue, wanted, idle=True)
            raise
        finally:
            self._take_types(free, -1)
        # Fewer jobs than slots and nothing left unexamined: the queue is empty (or paused)
        # and its fetcher waits; in strict mode that lets the queues after it have slots.
        dry = claim.paused or (len(claim.jobs) < wanted and not claim.more)
        self._slots.settle(queue, wanted - len(claim.jobs), idle=dry)
        self._start(queue, claim)
        return claim

    def _room(self, returning: Mapping[str, int] | None = None) -> dict[str, int]:
        """Free room per capped type: its concurrency less the jobs of it held, plus those
        of `returning` (jobs whose slots a claim takes as they are acked)."""
        returning = returning or {}
        # At least 0: while a claim sent with an ack holds the room of the jobs it acks,
        # the room left can be below nothing, and claim.lua takes a negative room for no
        # cap at all.
        return {
            name: max(0, cap - self._taken[name] + returning.get(name, 0))
            for name, cap in self._caps.items()
        }

    def _start(self, queue: str, claim: Claimed) -> None:
        """Start the jobs a claim gave, each in a task of its own."""
        if self._caps:
            self._take_types(Counter(job.type for job in claim.jobs), 1)
        if claim.due is not None:
            self._on_retry(queue, claim.due)  # the promoter wakes for the rate-limited jobs
        if claim.rate_limited or claim.held:
            self._metrics.limited(queue, claim.rate_limited, claim.held)
        create_task = asyncio.get_running_loop().create_task
        for job in claim.jobs:
            # Known as running from now on, before its task starts: see release_orphans.
            self._running[job.id] = running = _Running(job)
            running.task = create_task(self._execute(running))

    def _plan_claim(self, queue: str, attempts: list[Attempt]) -> ClaimRequest | None:
        """The claim to send with the ack of these attempts (Acker): as many jobs as their
        slots, which the ack frees before the claim runs, so that a cycle of a busy queue
        is one round trip (ack and claim), not two (the ack, then the claim the freed
        slots wake). Only for a queue that no other queue of the pool contends with for
        slots (the arbiter would hand them all to it anyway), and not once stopping."""
        if self._stopping or self._fetching.cancel_called or not self._slots.alone(queue):
            return None
        returning = Counter[str]()
        for attempt in attempts:
            running = self._acking.get((attempt.job_id, attempt.attempt))
            if running is not None and running.holds_slot:
                returning[running.job.type] += 1
        if not returning:
            return None
        free = self._room(returning)
        self._take_types(free, 1)
        return ClaimRequest(returning.total(), self._clock(), self._type_limits, free)

    def _claimed_with_ack(self, queue: str, request: ClaimRequest, claim: Claimed | None) -> None:
        """What the claim sent with an ack gave (None: the call failed). Called before the
        acked attempts are reported: the jobs take slots those attempts then give back."""
        self._take_types(request.free, -1)
        if claim is None or self._stopping or self._fetching.cancel_called:
            # Not started: the final requeue, or the orphan release, returns them.
            return
        self._slots.take(len(claim.jobs))
        self._start(queue, claim)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Fetch and run jobs until drain() is called, then requeue what did not finish."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._acker.run)
            try:
                with self._grace:
                    with self._fetching:
                        async with anyio.create_task_group() as fetchers:
                            for queue in self._queues:
                                fetchers.start_soon(self._fetch_loop, queue)
                            task_status.started()
                    await self._all_ended()
            finally:
                # Past the deadline, or the pool itself cancelled: no job outlives it.
                with anyio.CancelScope(shield=True):
                    await self._stop_jobs()
            # Fetching has stopped and every job has finished or been cancelled.
            with anyio.move_on_after(FINISH_TIMEOUT, shield=True):
                await self._finish()
            tg.cancel_scope.cancel()
        self._timeouts.close()
        self._stopped.set()

    async def drain(self, grace: float) -> None:
        """Stop fetching, let running jobs finish for `grace` seconds, requeue the rest."""
        self._fetching.cancel()
        self.hurry(grace)
        await self._stopped.wait()

    def hurry(self, grace: float = 0.0) -> None:
        """Cancel the running jobs `grace` seconds from now (a second stop signal)."""
        deadline = anyio.current_time() + grace
        self._grace.deadline = min(self._grace.deadline, deadline)

    async def _all_ended(self) -> None:
        """Wait until no job runs; call it once fetching stopped (no job starts after)."""
        while self._running:
            self._emptied = anyio.Event()
            await self._emptied.wait()

    async def _stop_jobs(self) -> None:
        """Cancel the running jobs and wait for them to end; stop waiting for the acks of
        the others (the final flush sends them, the final requeue returns what it could
        not)."""
        self._stopping = True
        for running in list(self._running.values()):
            if running.attempting:
                running.cancel(STOPPED)
        for running in list(self._acking.values()):
            self._forget(running)
        self._acking.clear()
        await self._all_ended()

    def _take_types(self, counts: Mapping[str, int], sign: int) -> None:
        for name, count in counts.items():
            if name in self._taken:
                self._taken[name] += sign * count

    async def _fetch_loop(self, queue: str) -> None:
        skip_poll = SKIP_POLL_MIN

        async def claim_then_wait() -> None:
            nonlocal skip_poll
            claim = await self.tick(queue)
            if claim.paused:
                await anyio.sleep(PAUSED_POLL)
            elif claim.more:
                pass
            elif claim.skipped:
                await self._a_job_ends(skip_poll)
            elif not claim.jobs:
                await self._store.wait_for_job(queue, self._daemon_id, self._block_timeout)
            # Back off only while nothing moves: a claim that started jobs resets it.
            quiet = claim.skipped and not claim.jobs
            skip_poll = min(2 * skip_poll, SKIP_POLL_MAX) if quiet else SKIP_POLL_MIN

        outage = Outage(f"fetching from queue {queue}", logger)
        await repeat(claim_then_wait, outage=outage, retry_delay=FETCH_RETRY_DELAY)

    async def _a_job_ends(self, seconds: float) -> None:
        """Wait until one of this daemon's jobs ends (its slots free), at most `seconds`."""
        if self._job_ended is None:
            self._job_ended = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._job_ended.wait()

    def cancel_local(self, job_id: str) -> bool:
        """Cancel a job this daemon runs, recording it cancelled; False if not running here
        (its attempt over, it only waits for its outcome to be recorded)."""
        running = self._running.get(job_id)
        if running is None or not running.attempting:
            return False
        running.cancel(CANCELLED)
        return True

    async def drop_lost(self) -> int:
        """Stop running jobs this daemon no longer owns (a reaper took them back).

        Called when the heartbeat finds this daemon was taken for dead: its jobs may
        already run elsewhere, so going on would only widen the window of duplicates.
        """
        by_queue: dict[str, list[_Running]] = {}
        for running in list(self._running.values()):
            if running.attempting:  # an outcome on its way is the ack's to settle
                by_queue.setdefault(running.job.queue, []).append(running)
        lost = 0
        for queue, runs in by_queue.items():
            ids = [running.job.id for running in runs]
            owned = await self._store.still_owned(queue, self._daemon_id, ids)
            for running in runs:
                # The attempt asked about, not a newer one of the same job claimed since.
                if running.job.id not in owned and running.attempting:
                    running.cancel(LOST)
                    lost += 1
        return lost

    async def release_orphans(self, grace_ms: int) -> int:
        """Return to the queue jobs this daemon's active sets hold but it does not run.

        That happens when a claim ran in Redis but its reply was lost (a dropped
        connection, a Redis restart): nothing would ever finish those jobs, and no reaper
        takes jobs from a live daemon. `grace_ms` keeps claims whose reply is still on
        its way out of it.
        """
        if self._stopping:
            # The jobs stopped or waiting for their ack are the final flush's and
            # requeue's now: taking them back here could run a finished job again.
            return 0
        before = self._clock() - grace_ms
        released = 0
        for queue in self._queues:
            claimed = await self._store.claimed_before(queue, self._daemon_id, before)
            orphans = [job_id for job_id in claimed if job_id not in self._running]
            if orphans:
                released += await self._store.requeue(
                    queue, self._daemon_id, orphans, self._clock()
                )
        if released:
            logger.warning("returned %d jobs this daemon held but did not run", released)
        return released

    async def _execute(self, running: _Running) -> None:
        job = running.job
        acking = False
        attempt: Attempt | None = None
        # The attempt's span is the current one in this job's task from here on, so that
        # its handler's own spans, and the requests it sends, nest under it.
        span = None if self._tracing is None else self._tracing.attempt(job)
        try:
            self._metrics.started(job.queue, job.type, job.waited_ms / 1000)
            timeout = self._handlers.timeout_of(job)
            attempt = await running.attempt(self._attempt(job), timeout, self._timeouts)
            if attempt is None:
                if running.reason == LOST:
                    logger.warning("job %s stopped: it was taken back from this daemon", job.id)
                    self._metrics.attempt_lost(job.queue)
                    return
                if running.reason == STOPPED:
                    return  # the pool's final requeue returns it to its queue
                attempt = self._interrupted(job, running.reason)
            ran = (self._clock() - (job.started_at or self._clock())) / 1000
            self._metrics.finished(job.queue, job.type, attempt.outcome, ran)
            self._acker.record(job.queue, attempt)
            # Stopping: the final flush sends the outcome, nobody waits for it.
            acking = not self._stopping
            if acking:
                self._acking[job.id, job.attempts] = running
        except Exception:
            # No task group to take it to: our bug, and it ends this job, not the pool.
            logger.exception("job %s (%s) crashed the worker", job.id, job.type)
        finally:
            if span is not None:
                span.end(attempt, running.reason)
            # A job waiting for its ack keeps its slot, so that no more jobs than slots
            # are ever this daemon's in Redis (and at most that many run again should it
            # die); its task ends here all the same, and _recorded frees the slot.
            if not acking:
                self._forget(running)

    def _recorded(self, attempt: Attempt, recorded: bool) -> None:
        """The acker recorded an outcome (or Redis dropped it): the job is done here."""
        # By attempt: taken back from this daemon while its outcome waited, the job can
        # have been claimed here again, and the newer attempt is not done.
        running = self._acking.pop((attempt.job_id, attempt.attempt), None)
        if running is None:
            return
        # Slot first: the acker logs a failure of what follows, for this job alone.
        self._forget(running)
        if not recorded:
            self._metrics.attempt_lost(running.job.queue)
        # An attempt Redis dropped ended nothing: the job's newer attempt owns it.
        elif attempt.outcome in FINAL_OUTCOMES:
            self._on_final(running.job)

    def _forget(self, running: _Running) -> None:
        """The job is no longer this daemon's concern (unless a newer attempt of it is):
        its slot is free."""
        if self._running.get(running.job.id) is running:
            del self._running[running.job.id]
        if running.holds_slot:
            running.holds_slot = False
            if running.job.type in self._taken:
                self._taken[running.job.type] -= 1
            self._slots.release()
            if self._job_ended is not None:
                self._job_ended.set()
                self._job_ended = None
        if not self._running:
            self._emptied.set()

    async def _attempt(self, job: Job) -> Attempt:
        logger.debug("job %s (%s) started, attempt %d", job.id, job.type, job.attempts)

        if job.type in self._python_types:
            # Only a Python handler can report progress. Set in this job's own task, so it
            # reaches only this job's handler.
            set_reporter(self._reporter(job))
        try:
            result = await self._handlers.run(job)
        except JobFailed as exc:
            return self._failed(job, str(exc), permanent=exc.permanent)
        except Exception as exc:
            # Handlers turn their errors into JobFailed; anything else is our bug, and it
            # must fail the one job, not the pool.
            logger.exception("job %s (%s) crashed the worker", job.id, job.type)
            return self._failed(job, f"internal error: {exc!r}", permanent=False)
        logger.debug("job %s (%s) completed", job.id, job.type)
        return self._ended(job, "completed", result)

    def _reporter(self, job: Job) -> Callable[[float, str], Awaitable[None]]:
        async def report(value: float, message: str) -> None:
            await self._store.report_progress(job, self._daemon_id, value, message, self._clock())

        return report

    def _interrupted(self, job: Job, reason: str) -> Attempt:
        """The attempt of a job cancelled by a request or by its timeout."""
        if reason == CANCELLED:
            return self._ended(job, "cancelled", "cancelled while running")
        failure = self._handlers.timed_out(job)
        return self._failed(job, str(failure), permanent=failure.permanent)

    def _failed(self, job: Job, error: str, *, permanent: bool) -> Attempt:
        policy = self._handler_configs.get(job.type)
        if permanent or policy is None or job.attempts >= job.max_attempts:
            logger.warning("job %s (%s) failed for good: %s", job.id, job.type, error)
            return self._ended(job, "failed", error)
        wait = backoff(job.attempts, policy.backoff_base, policy.backoff_max)
        logger.warning(
            "job %s (%s) failed attempt %d of %d, retrying in %.1f s: %s",
            job.id, job.type, job.attempts, job.max_attempts, wait, error,
        )  # fmt: skip
        return self._ended(job, "retry", error, retry_at=self._clock() + int(wait * 1000))

    def _ended(self, job: Job, outcome: str, value: bytes | str, retry_at: int = 0) -> Attempt:
        # The ack script records it: a retry's history entry written from this and the hash.
        return Attempt(job.id, job.attempts, outcome, value, retry_at, self._clock())

    async def _finish(self) -> None:
        await self._acker.flush()
        for queue in self._queues:
            moved = await self._store.requeue_inflight(queue, self._daemon_id, self._clock())
            if moved:
                logger.info("returned %d unfinished jobs to queue %s", moved, queue)


class _Running:
    """A job of this daemon's: its task, and why its attempt was cancelled, if it was.

    An attempt is cancelled (cancel_local, drop_lost, stop, or its handler's timeout) by
    cancelling its task: the first cause wins, and a later one does nothing. Again only
    RECANCEL_SECONDS later if it still runs, so that a handler's shielded clean-up (an
    exec handler reaping its program) runs to its end, as under an anyio cancel scope,
    without one: entering and leaving one cost more than the rest of a short job's run.
    Once the attempt ended (`attempting` False) the job, its task over, only waits for its
    outcome to be recorded, holding its slot.
    """

    __slots__ = ("attempting", "holds_slot", "job", "reason", "started", "task")

    task: asyncio.Task[None]  # held here: the loop keeps only a weak reference to it

    def __init__(self, job: Job) -> None:
        self.job = job
        self.reason = ""  # CANCELLED, LOST, STOPPED or TIMED_OUT once cancelled
        self.attempting = True
        self.holds_slot = True  # until its outcome is recorded, or it is let go
        self.started = False  # its task has begun to run

    def cancel(self, reason: str) -> None:
        if self.reason or not self.attempting:
            return
        self.reason = reason
        # A task cancelled before it began would never run its clean-up: attempt() sees
        # the reason instead.
        if self.started:
            self._deliver()

    def _deliver(self) -> None:
        if self.attempting:
            self.task.cancel()
            # A handler that swallowed it (caught the CancelledError and went on awaiting)
            # is cancelled again, as under an anyio cancel scope, but a while later, so
            # that a shielded clean-up in progress ends first.
            self.task.get_loop().call_later(RECANCEL_SECONDS, self._deliver)

    async def attempt(
        self, run: Coroutine[Any, Any, Attempt], seconds: float, timeouts: Timeouts[_Running]
    ) -> Attempt | None:
        """Await `run` in this job's task, for `seconds` at most (`timeouts` cancels it
        then); None if cancelled."""
        self.started = True
        try:
            if self.reason:
                run.close()
                return None
            timeouts.start(self, seconds)
            return await run
        except asyncio.CancelledError:
            if not self.reason:
                raise  # not ours: the loop itself is closing
            self.task.uncancel()
            return None
        finally:
            self.attempting = False
            timeouts.end(self, seconds)


def _timed_out(running: _Running) -> None:
    running.cancel(TIMED_OUT)


def backoff(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before the attempt after `attempt`: exponential, capped, jittered.

    The jitter keeps the lower half of each step ("equal jitter"): retries of jobs that
    failed together spread out, yet a wait never falls far below its step.
    """
    step = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return step / 2 + rand() * step / 2
