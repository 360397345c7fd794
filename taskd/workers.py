"""The worker pool: fetches jobs of this daemon's queues, runs them, and acknowledges them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import orjson
from anyio.abc import TaskGroup

from taskd.acker import Acker
from taskd.handlers import Handlers, JobFailed
from taskd.jobs import Job, now_ms
from taskd.store import Outcome, Store

logger = logging.getLogger(__name__)

# Most jobs claimed in one round trip: large enough to amortise the round trip under load,
# small enough that one script call stays short.
FETCH_BATCH = 100
# How long a blocking fetch waits on an empty queue before it looks again. Arrivals end the
# wait at once; this only bounds how long a connection sits in one command.
BLOCK_TIMEOUT = 5
# Pause after a failed fetch (Redis down), so a dead Redis is not hammered.
FETCH_RETRY_DELAY = 0.5
# Longest the final requeue may take at shutdown; past it the reaper recovers the rest.
FINISH_TIMEOUT = 10.0


class WorkerPool:
    """Runs up to `concurrency` jobs at once, fetched from `queues`.

    Fetching is one task per queue, not one per slot: it claims as many ready jobs as
    there are free slots in one script call, and blocks (BLMOVE) only when the queue is
    empty, so connections stay few as concurrency grows and an idle daemon starts a new
    job the moment it arrives.
    """

    def __init__(
        self,
        *,
        store: Store,
        handlers: Handlers,
        daemon_id: str,
        queues: Sequence[str],
        concurrency: int,
        clock: Callable[[], int] = now_ms,
        fetch_batch: int = FETCH_BATCH,
        block_timeout: int = BLOCK_TIMEOUT,
    ) -> None:
        self._store = store
        self._handlers = handlers
        self._daemon_id = daemon_id
        self._queues = tuple(queues)
        self._concurrency = concurrency
        self._clock = clock
        self._fetch_batch = fetch_batch
        self._block_timeout = block_timeout
        self._slots = anyio.Semaphore(concurrency)
        self._acker = Acker(store=store, daemon_id=daemon_id, clock=clock)
        self._runners: TaskGroup | None = None
        self._fetching = anyio.CancelScope()
        self._stopped = anyio.Event()

    @property
    def active(self) -> int:
        """Slots in use: jobs running, being claimed, or waiting for their ack."""
        return self._concurrency - self._slots.value

    async def tick(self, queue: str) -> int:
        """One fetch pass: claim as many ready jobs as free slots allow, and start them."""
        assert self._runners is not None, "tick() runs inside run()"
        await self._slots.acquire()
        wanted = 1
        while wanted < self._fetch_batch and self._slots.value > 0:
            self._slots.acquire_nowait()
            wanted += 1
        try:
            jobs = await self._store.claim(queue, self._daemon_id, wanted, self._clock())
        except BaseException:
            self._release(wanted)
            raise
        self._release(wanted - len(jobs))
        for job in jobs:
            self._runners.start_soon(self._execute, job, name=f"job {job.id}")
        return len(jobs)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Fetch and run jobs until drain() is called, then requeue what did not finish."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._acker.run)
            async with anyio.create_task_group() as runners:
                self._runners = runners
                with self._fetching:
                    async with anyio.create_task_group() as fetchers:
                        for queue in self._queues:
                            fetchers.start_soon(self._fetch_loop, queue)
                        task_status.started()
            # Fetching has stopped and every runner has finished or been cancelled.
            with anyio.move_on_after(FINISH_TIMEOUT, shield=True):
                await self._finish()
            tg.cancel_scope.cancel()
        self._stopped.set()

    async def drain(self, grace: float) -> None:
        """Stop fetching, let running jobs finish for `grace` seconds, requeue the rest."""
        self._fetching.cancel()
        self.hurry(grace)
        await self._stopped.wait()

    def hurry(self, grace: float = 0.0) -> None:
        """Cancel the running jobs `grace` seconds from now (a second stop signal)."""
        if self._runners is not None:
            deadline = anyio.current_time() + grace
            scope = self._runners.cancel_scope
            scope.deadline = min(scope.deadline, deadline)

    async def _fetch_loop(self, queue: str) -> None:
        failures = 0
        while True:
            try:
                if await self.tick(queue) == 0:
                    await self._store.wait_for_job(queue, self._daemon_id, self._block_timeout)
                failures = 0
            except Exception:
                failures += 1
                # One traceback per outage, not one per retry.
                logger.log(
                    logging.ERROR if failures == 1 else logging.DEBUG,
                    "fetching from queue %s failed; retrying",
                    queue,
                    exc_info=True,
                )
                await anyio.sleep(FETCH_RETRY_DELAY)

    async def _execute(self, job: Job) -> None:
        try:
            outcome = await self._attempt(job)
            await self._acker.record(job.queue, outcome)
        finally:
            self._slots.release()

    async def _attempt(self, job: Job) -> Outcome:
        logger.debug("job %s (%s) started, attempt %d", job.id, job.type, job.attempts)
        try:
            result = await self._handlers.run(job)
        except JobFailed as exc:
            logger.warning("job %s (%s) failed: %s", job.id, job.type, exc)
            return Outcome(job.id, completed=False, value=str(exc))
        except Exception as exc:
            # Handlers turn their errors into JobFailed; anything else is our bug, and it
            # must fail the one job, not the pool.
            logger.exception("job %s (%s) crashed the worker", job.id, job.type)
            return Outcome(job.id, completed=False, value=f"internal error: {exc!r}")
        logger.debug("job %s (%s) completed", job.id, job.type)
        return Outcome(job.id, completed=True, value=orjson.dumps(result))

    async def _finish(self) -> None:
        await self._acker.flush()
        for queue in self._queues:
            moved = await self._store.requeue_inflight(queue, self._daemon_id)
            if moved:
                logger.info("returned %d unfinished jobs to queue %s", moved, queue)

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()
