"""The heartbeat: a daemon's record kept, a daemon taken for dead or an emptied Redis noticed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from taskd.heartbeat import Heartbeat, Identity
from taskd.store import Keys, Store
from tests import handler_funcs
from tests.builders import Clock, Q, new_job, reaper, stored
from tests.support import ECHO, make_config, running_daemon, wait_until

K = Keys("taskd")
ME = Identity(id="me", host="h", pid=1, started_at=1_000_000)


class Beats:
    """A heartbeat of daemon ME on a test clock; `calls` counts what it reported, by name."""

    def __init__(self, store: Store) -> None:
        self.clock = Clock()
        self.calls: Counter[str] = Counter()
        self.heartbeat = Heartbeat(
            store=store,
            identity=ME,
            concurrency=4,
            queues=[Q],
            types=["echo"],
            active=lambda: 2,
            interval=1,
            on_reaped=self._count("reaped"),
            after_beat=self._count("beats"),
            on_data_lost=lambda: self.calls.update(["data_lost"]),
            clock=self.clock,
        )

    def _count(self, name: str) -> Callable[[], Awaitable[None]]:
        async def count() -> None:
            self.calls[name] += 1

        return count


@pytest.fixture
def beats(store: Store) -> Beats:
    return Beats(store)


async def test_each_beat_writes_the_record_with_the_time_and_active_count(
    beats: Beats, redis: Redis
) -> None:
    await beats.heartbeat.tick()
    assert await redis.zscore(K.daemons, ME.id) == beats.clock.now
    beats.clock.now += 500
    await beats.heartbeat.tick()
    assert await redis.zscore(K.daemons, ME.id) == beats.clock.now
    record = await redis.hgetall(K.daemon(ME.id))
    assert (record[b"active"], record[b"concurrency"]) == (b"2", b"4")
    assert record[b"types"] == b'["echo"]'
    assert beats.calls == {"beats": 2}


async def test_a_beat_on_its_way_when_the_daemon_deregisters_does_not_register_it_again(
    beats: Beats, store: Store, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await beats.heartbeat.tick()
    # A beat sent just before the shutdown deregisters, reaching Redis after it.
    beat = store.beat
    sent = anyio.Event()
    lands = anyio.Event()

    async def late_beat(info: Any) -> Any:
        sent.set()
        await lands.wait()
        return await beat(info)

    monkeypatch.setattr(store, "beat", late_beat)
    async with anyio.create_task_group() as tg:
        tg.start_soon(beats.heartbeat.tick)
        await sent.wait()
        tg.start_soon(beats.heartbeat.deregister)
        # Time for the deregistration to go first, if nothing holds it back (the bug this
        # test is for); the beat is held, so the order is the only thing that can differ.
        await anyio.sleep(0.05)
        lands.set()
    assert await redis.zscore(K.daemons, ME.id) is None
    assert not await redis.exists(K.daemon(ME.id))
    # And a later tick (the loop not yet cancelled) writes nothing.
    monkeypatch.setattr(store, "beat", beat)
    await beats.heartbeat.tick()
    assert await redis.zscore(K.daemons, ME.id) is None


async def test_a_beat_after_a_reaper_took_it_for_dead_registers_again_and_says_so(
    beats: Beats, store: Store, redis: Redis
) -> None:
    await beats.heartbeat.tick()
    assert beats.calls["reaped"] == 0  # registering the first time is no reaping
    beats.clock.now += 60_000  # silent past dead_after (30 s) for another daemon's reaper
    await reaper(store, beats.clock, me="other").tick()
    assert await redis.zscore(K.daemons, ME.id) is None
    await beats.heartbeat.tick()
    assert beats.calls == {"beats": 2, "reaped": 1}
    assert await redis.zscore(K.daemons, ME.id) == beats.clock.now
    await beats.heartbeat.tick()  # registered again: the next beat is an ordinary one
    assert beats.calls == {"beats": 3, "reaped": 1}


async def test_a_beat_that_finds_redis_emptied_reports_the_data_lost(
    beats: Beats, redis: Redis
) -> None:
    await beats.heartbeat.tick()
    await redis.flushall()  # a restart without persistence, or a fail-over to an empty replica
    await beats.heartbeat.tick()
    # The record is gone with the rest: its jobs are stopped as when it was taken for dead.
    assert beats.calls == {"beats": 2, "data_lost": 1, "reaped": 1}
    await beats.heartbeat.tick()
    assert beats.calls == {"beats": 3, "data_lost": 1, "reaped": 1}


# The heartbeat in a running daemon


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
                Q, daemon.identity.id, 1, now=daemon.identity.started_at - 5000, type_limits=ECHO
            )

            async def done() -> bool:
                return await redis.hget(K.job(Q, job.id), "state") == b"completed"

            await wait_until(done, "the orphaned job to be returned and run")
        finished = await stored(store, job.id)
        assert (finished.result, finished.attempts) == ("found", 1)
    finally:
        await store.close()
