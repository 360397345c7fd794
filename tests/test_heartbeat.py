"""The heartbeat: a daemon taken for dead stops its lost jobs; orphaned claims are run after all."""

from __future__ import annotations

from redis.asyncio import Redis

from taskd.keys import Keys
from taskd.store import Store
from tests import handler_funcs
from tests.builders import Clock, Q, new_job, reaper, stored
from tests.support import ECHO, make_config, running_daemon, wait_until

K = Keys("taskd")


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
            jobs = [new_job("tracked", 60) for _ in range(3)]
            for job in jobs:
                await store.enqueue(job)
            ids = [job.id for job in jobs]

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
                assert [h["outcome"] for h in (await stored(store, job_id)).history] == ["lost"]
    finally:
        await store.close()


async def test_a_claim_whose_reply_was_lost_is_run_after_all(redis_url: str, redis: Redis) -> None:
    config = make_config(redis_url, handlers={"echo": {"builtin": "echo"}})
    store = Store.from_url(redis_url, prefix="taskd")
    try:
        async with running_daemon(config) as daemon:
            job = new_job(payload="found")
            await store.enqueue(job)
            # The claim runs in Redis for the daemon, but the daemon never hears of it.
            await store.claim(
                Q, daemon.identity.id, 1, now=daemon.identity.started_at - 5000, limits=ECHO
            )

            async def done() -> bool:
                return await redis.hget(K.job(Q, job.id), "state") == b"completed"

            await wait_until(done, "the orphaned job to be returned and run")
        finished = await stored(store, job.id)
        assert (finished.result, finished.attempts) == ("found", 1)
    finally:
        await store.close()
