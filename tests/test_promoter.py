"""The promoter: scheduled jobs made ready when due, one tick at a time on a test clock."""

from __future__ import annotations

from redis.asyncio import Redis

from taskd.promoter import Promoter
from taskd.store import Store
from tests.builders import Clock, Q, enqueue
from tests.support import ready_ids


async def test_promoter_moves_jobs_when_due_and_reports_the_next(
    store: Store, redis: Redis
) -> None:
    clock = Clock()
    promoter = Promoter(store=store, queues=[Q], clock=clock)
    await enqueue(store, 2, run_at=clock.now + 1000)
    await enqueue(store, 1, run_at=clock.now + 5000)

    assert await promoter.tick() == clock.now + 1000
    assert len(await ready_ids(redis, Q)) == 0
    clock.now += 1000
    assert await promoter.tick() == clock.now + 4000
    assert len(await ready_ids(redis, Q)) == 2
    clock.now += 4000
    assert await promoter.tick() is None
    assert len(await ready_ids(redis, Q)) == 3


async def test_promoter_drains_more_than_one_batch(store: Store, redis: Redis) -> None:
    clock = Clock()
    await enqueue(store, 1200, run_at=clock.now)
    assert await Promoter(store=store, queues=[Q], clock=clock).tick() is None
    assert len(await ready_ids(redis, Q)) == 1200
