"""The reaper: a dead daemon's jobs and record taken back, one tick at a time on a test clock."""

from __future__ import annotations

import anyio
from redis.asyncio import Redis

from taskd.store import DaemonInfo, Keys, Store
from tests.builders import Clock, Q, enqueue, reaper
from tests.support import ECHO

K = Keys("taskd")
DEAD_AFTER = 30.0


async def test_two_reapers_take_a_dead_daemons_jobs_back_exactly_once(
    redis_url: str, redis: Redis
) -> None:
    clock = Clock()
    stores = [Store.from_url(redis_url, prefix="taskd") for _ in range(2)]
    try:
        await enqueue(stores[0], 300)
        await stores[0].beat(DaemonInfo("dead", "h", 1, 1, 300, (Q,), 300, clock.now))
        await stores[0].claim(Q, "dead", 300, clock.now, type_limits=ECHO)
        clock.now += int(DEAD_AFTER * 1000) + 1
        results: list[int] = []

        async def reap(store: Store, me: str) -> None:
            results.append(await reaper(store, clock, me, dead_after=DEAD_AFTER).tick())

        async with anyio.create_task_group() as tg:
            tg.start_soon(reap, stores[0], "r1")
            tg.start_soon(reap, stores[1], "r2")
    finally:
        for store in stores:
            await store.close()
    assert sum(results) == 300
    ready = await redis.lrange(K.inbox(Q), 0, -1)
    assert len(ready) == len(set(ready)) == 300
    assert await redis.zcard(K.active(Q, "dead")) == 0
    assert await redis.zcard(K.daemons) == 0  # its record is gone too


async def test_reaper_leaves_live_daemons_and_itself_alone(store: Store, redis: Redis) -> None:
    clock = Clock()
    await enqueue(store, 2)
    await store.claim(Q, "me", 1, clock.now, type_limits=ECHO)
    await store.claim(Q, "other", 1, clock.now, type_limits=ECHO)
    clock.now += int(DEAD_AFTER * 1000)  # exactly dead_after: not yet dead
    assert await reaper(store, clock, me="x", dead_after=DEAD_AFTER).tick() == 0
    clock.now += 1
    assert await reaper(store, clock, me="me", dead_after=DEAD_AFTER).tick() == 1  # "other" only
    assert await redis.zcard(K.active(Q, "me")) == 1
