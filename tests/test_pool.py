"""The worker pool on its own: a slot serves the next job while an outcome is on the wire."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import pytest

from taskd.handlers import Handlers
from taskd.metrics import Metrics
from taskd.store import Attempt, Store
from taskd.workers import WorkerPool
from tests.builders import Q, enqueue, stored
from tests.support import make_config, wait_until

ME = "pool-test"


class HeldAcks(Store):
    """A store whose acks wait for the test to let them through, then go to Redis."""

    def __init__(self, store: Store) -> None:
        super().__init__(connection=store.connection)
        self.through = anyio.Event()
        self.waiting = 0

    async def ack(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], now: int
    ) -> list[bool]:
        self.waiting += len(attempts)
        await self.through.wait()
        return await super().ack(queue, daemon_id, attempts, now)


@asynccontextmanager
async def running_pool(store: Store, redis_url: str, concurrency: int) -> AsyncIterator[WorkerPool]:
    config = make_config(redis_url, workers={"concurrency": concurrency})
    async with Handlers(config.handlers) as handlers, anyio.create_task_group() as tg:
        pool = WorkerPool(
            store=store,
            handlers=handlers,
            handler_configs=config.handlers,
            daemon_id=ME,
            queues=[Q],
            concurrency=concurrency,
            metrics=Metrics(concurrency=concurrency),
        )
        await tg.start(pool.run)
        yield pool
        await pool.drain(5)


@pytest.mark.timeout(30)
async def test_a_slot_runs_the_next_job_while_the_last_outcome_waits_for_its_ack(
    store: Store, redis_url: str
) -> None:
    held = HeldAcks(store)
    jobs = await enqueue(store, 3)
    async with running_pool(held, redis_url, concurrency=1) as pool:
        # One slot, and no ack gets through: the third job was claimed all the same, so
        # the slot was free again after each of the first two ran.
        await wait_until(lambda: _claimed(store, 3), "3 jobs claimed")
        assert held.waiting >= 1
        await wait_until(lambda: _idle(pool), "the slot free")
        assert [(await stored(store, job.id)).state for job in jobs] == ["active"] * 3
        held.through.set()
        await wait_until(lambda: _completed(store, 3), "3 jobs completed")


@pytest.mark.timeout(60)
async def test_claims_wait_while_outcomes_pile_up_unacked(store: Store, redis_url: str) -> None:
    held = HeldAcks(store)
    await enqueue(store, 700)
    async with running_pool(held, redis_url, concurrency=10):
        # Claims stop once max(concurrency, 500) outcomes wait (give or take the last
        # claim's 10): the jobs stay queued rather than finish in this daemon's memory.
        await wait_until(lambda: _claimed(store, 500), "500 jobs claimed")
        await anyio.sleep(0.5)  # time for claims that should not happen
        claimed = await _active(store)
        assert 500 <= claimed <= 510
        held.through.set()
        await wait_until(lambda: _completed(store, 700), "700 jobs completed", deadline=30)


async def _active(store: Store) -> int:
    return int(await store.connection.client.zcard(store.keys.active(Q, ME)))


async def _claimed(store: Store, count: int) -> bool:
    return await _active(store) >= count


async def _idle(pool: WorkerPool) -> bool:
    return pool.active == 0


async def _completed(store: Store, count: int) -> bool:
    return int(await store.connection.client.zcard(store.keys.completed(Q))) == count
