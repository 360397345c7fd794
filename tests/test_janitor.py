"""The janitor: finished jobs deleted after their retention, one tick at a time on a test clock."""

from __future__ import annotations

from redis.asyncio import Redis

from taskd.config import RetentionConfig
from taskd.janitor import Janitor
from taskd.store import Inspector, Keys, Store, TypeLimits
from tests.builders import Clock, Q, ended, enqueue, new_job
from tests.support import ECHO

K = Keys("taskd")
RETENTION = RetentionConfig(completed=60, failed=600)


async def test_janitor_deletes_finished_jobs_after_their_retention(
    store: Store, redis: Redis
) -> None:
    clock = Clock()
    await enqueue(store, 2)
    done, dead = (await store.claim(Q, "d", 2, clock.now, type_limits=ECHO)).jobs
    await store.ack(Q, "d", [ended(done, "completed", "1"), ended(dead, "failed", "x")], clock.now)
    janitor = Janitor(store=store, queues=[Q], retention=RETENTION, clock=clock)
    assert await janitor.tick() == 0
    clock.now += 60_000
    assert await janitor.tick() == 1
    assert await store.get_job(done.id, [Q]) is None
    assert await store.get_job(dead.id, [Q]) is not None
    clock.now += 540_000
    assert await janitor.tick() == 1
    # Nothing of the jobs is left: no record, no id in any set; only bounded statistics.
    bounded = {K.totals(Q), K.leases(Q), K.waits(Q), K.runs(Q), K.throughput(Q)}
    bounded |= set(K.page_counters(Q))  # the paged index's counters, one of each
    assert set(await redis.keys()) == {key.encode() for key in bounded}


async def test_janitor_frees_jobs_held_for_a_limit_since_removed(
    store: Store, inspector: Inspector
) -> None:
    clock = Clock()
    jobs = [new_job("slow", n) for n in range(3)]
    await store.enqueue_many(jobs)
    limited = [TypeLimits("slow", concurrency=1)]
    assert (await store.claim(Q, "d", 10, clock.now, type_limits=limited)).held == 2
    # A daemon that still has the limit leaves them held; one without it frees them.
    await Janitor(store=store, queues=[Q], retention=RETENTION, clock=clock).tick()
    assert (await inspector.limit_status(Q, limited, clock.now))["slow"]["held"] == 2
    janitor = Janitor(store=store, queues=[Q], retention=RETENTION, unlimited=["slow"], clock=clock)
    await janitor.tick()
    assert (await inspector.limit_status(Q, limited, clock.now))["slow"]["held"] == 0
    claimed = (await store.claim(Q, "d", 10, clock.now, type_limits=[TypeLimits("slow")])).jobs
    assert [j.id for j in claimed] == [j.id for j in jobs[1:]]
