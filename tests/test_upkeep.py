"""The promoter, reaper and janitor, one tick at a time on a clock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import orjson
import pytest
from redis.asyncio import Redis

from taskd.config import RetentionConfig
from taskd.janitor import Janitor
from taskd.jobs import QUEUED, SCHEDULED, Job, new_id
from taskd.metrics import Metrics
from taskd.promoter import Promoter
from taskd.reaper import Reaper
from taskd.store import Attempt, DaemonInfo, Inspector, Keys, Store, TypeLimits
from tests import handler_funcs
from tests.support import ECHO, make_config, ready_ids, running_daemon, wait_until

Q = "default"
K = Keys("taskd")
DEAD_AFTER = 30.0


class Clock:
    """Epoch milliseconds that move only when the test says so."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(redis_url, prefix="taskd")
    yield store
    await store.close()


async def enqueue(store: Store, count: int, run_at: int | None = None) -> list[Job]:
    jobs = []
    for _ in range(count):
        state = SCHEDULED if run_at else QUEUED
        job = Job(new_id(), "echo", Q, None, state, 0, 1, max_attempts=3, run_at=run_at)
        await store.enqueue(job)
        jobs.append(job)
    return jobs


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


def reaper(store: Store, clock: Clock, me: str = "live") -> Reaper:
    return Reaper(
        store=store,
        daemon_id=me,
        queues=[Q],
        interval=1,
        dead_after=DEAD_AFTER,
        metrics=Metrics(concurrency=1),
        clock=clock,
    )


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
            results.append(await reaper(store, clock, me).tick())

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
    assert await reaper(store, clock, me="x").tick() == 0
    clock.now += 1
    assert await reaper(store, clock, me="me").tick() == 1  # "other" only
    assert await redis.zcard(K.active(Q, "me")) == 1


async def test_janitor_deletes_finished_jobs_after_their_retention(
    store: Store, redis: Redis
) -> None:
    clock = Clock()
    done, dead = await enqueue(store, 2)
    await store.claim(Q, "d", 2, clock.now, type_limits=ECHO)
    await store.ack(Q, "d", [_ended(done, "completed"), _ended(dead, "failed")], clock.now)
    janitor = Janitor(
        store=store, queues=[Q], retention=RetentionConfig(completed=60, failed=600), clock=clock
    )
    assert await janitor.tick() == 0
    clock.now += 60_000
    assert await janitor.tick() == 1
    assert await store.get_job(done.id, [Q]) is None
    assert await store.get_job(dead.id, [Q]) is not None
    clock.now += 540_000
    assert await janitor.tick() == 1
    # Nothing of the jobs is left: no record, no id in any set; only bounded statistics.
    bounded = {K.totals(Q), K.leases(Q), K.waits(Q), K.runs(Q), K.throughput(Q)}
    assert set(await redis.keys()) == {key.encode() for key in bounded}


async def test_janitor_frees_jobs_held_for_a_limit_since_removed(
    store: Store, inspector: Inspector
) -> None:
    clock = Clock()
    jobs = [Job(new_id(), "slow", Q, n, QUEUED, 0, 1, max_attempts=3) for n in range(3)]
    await store.enqueue_many(jobs)
    limited = [TypeLimits("slow", concurrency=1)]
    assert (await store.claim(Q, "d", 10, clock.now, type_limits=limited)).held == 2
    retention = RetentionConfig(completed=60, failed=600)
    # A daemon that still has the limit leaves them held; one without it frees them.
    await Janitor(store=store, queues=[Q], retention=retention, clock=clock).tick()
    assert (await inspector.limit_status(Q, limited, clock.now))["slow"]["held"] == 2
    janitor = Janitor(store=store, queues=[Q], retention=retention, unlimited=["slow"], clock=clock)
    await janitor.tick()
    assert (await inspector.limit_status(Q, limited, clock.now))["slow"]["held"] == 0
    claimed = (await store.claim(Q, "d", 10, clock.now, type_limits=[TypeLimits("slow")])).jobs
    assert [j.id for j in claimed] == [j.id for j in jobs[1:]]


def _ended(job: Job, outcome: str) -> Attempt:
    return Attempt(job.id, 1, outcome, "1" if outcome == "completed" else "x", 0, orjson.dumps({}))


async def test_a_daemon_taken_for_dead_stops_its_lost_jobs(redis_url: str, redis: Redis) -> None:
    handler_funcs.TRACKER = handler_funcs.Gauge()
    config = make_config(
        redis_url,
        workers={"concurrency": 3},
        handlers={"tracked": {"python": "tests.handler_funcs:tracked"}},
    )
    store = Store.from_url(redis_url, prefix="taskd")
    try:
        async with running_daemon(config) as daemon:
            ids = [await _enqueue_tracked(store, seconds=60) for _ in range(3)]

            async def all_running() -> bool:
                return handler_funcs.TRACKER.running == 3

            await wait_until(all_running, "3 jobs running")
            # Another daemon's reaper, with a clock far ahead, finds this one silent.
            far_ahead = Clock(daemon.identity.started_at + 3_600_000)
            assert await reaper(store, far_ahead, me="other").tick() == 3

            async def rerun() -> bool:
                attempts = [await redis.hget(K.job(Q, i), "attempts") for i in ids]
                return attempts == [b"2"] * 3 and handler_funcs.TRACKER.running == 3

            # Its next heartbeat notices, stops the lost attempts, and it claims them anew.
            await wait_until(rerun, "the jobs to run again as second attempts")
            assert handler_funcs.TRACKER.peak == 3
            for job_id in ids:
                job = await store.get_job(job_id, [Q])
                assert job is not None
                assert [h["outcome"] for h in job.history] == ["lost"]
    finally:
        await store.close()


async def _enqueue_tracked(store: Store, seconds: float) -> str:
    job = Job(new_id(), "tracked", Q, seconds, QUEUED, 0, 1, max_attempts=3)
    await store.enqueue(job)
    return job.id


async def test_a_claim_whose_reply_was_lost_is_run_after_all(redis_url: str, redis: Redis) -> None:
    config = make_config(redis_url, handlers={"echo": {"builtin": "echo"}})
    store = Store.from_url(redis_url, prefix="taskd")
    try:
        async with running_daemon(config) as daemon:
            job = Job(new_id(), "echo", Q, "found", QUEUED, 0, 1, max_attempts=3)
            await store.enqueue(job)
            # The claim runs in Redis for the daemon, but the daemon never hears of it.
            await store.claim(
                Q, daemon.identity.id, 1, now=daemon.identity.started_at - 5000, type_limits=ECHO
            )

            async def done() -> bool:
                return await redis.hget(K.job(Q, job.id), "state") == b"completed"

            await wait_until(done, "the orphaned job to be returned and run")
        finished = await store.get_job(job.id, [Q])
        assert finished is not None
        assert (finished.result, finished.attempts) == ("found", 1)
    finally:
        await store.close()
