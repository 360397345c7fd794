"""Single submissions that arrive together share one enqueue call (Store.enqueue's group
commit): each caller gets its own answer, its own error, or its own cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis

from taskd.embedded import RedisServer
from taskd.store import UNAVAILABLE, Keys, Store, is_full
from taskd.store.store import ENQUEUE_LANE_AFTER_S, ENQUEUE_LANE_MIN
from tests.builders import new_job, stored
from tests.proxy import Proxy
from tests.support import fill, indexed_ids, wait_until

K = Keys("taskd")
TOGETHER = 20


async def enqueue_calls(redis: Redis) -> int:
    """Enqueue script calls Redis ran so far (every script is an EVALSHA)."""
    return int((await redis.info("commandstats"))["cmdstat_evalsha"]["calls"])


async def until_sent(proxy: Proxy) -> None:
    """Until an enqueue call is on its way through the blackholed proxy."""

    async def sent() -> bool:
        return proxy.held > 0

    await wait_until(sent, "the call to be on its way")


@pytest.fixture
async def proxied(proxy: Proxy) -> AsyncIterator[Store]:
    """A store whose Redis is behind the proxy, its connection open and script loaded."""
    store = Store.from_url(proxy.url, prefix="taskd")
    await store.enqueue(new_job())
    yield store
    await store.close()


async def test_jobs_arriving_together_go_in_one_call_each_stored_as_given(
    store: Store, redis: Redis
) -> None:
    await store.enqueue(new_job())  # the script loaded, so that only enqueue calls count
    # Submitted at different moments, in different priorities, scheduled or not.
    jobs = [
        new_job(payload={"n": n}, created_at=1_000 + n, priority=n % 10, run_at=n * 10_000 or None)
        for n in range(TOGETHER)
    ]
    calls = await enqueue_calls(redis)
    holders = await asyncio.gather(*(store.enqueue(job) for job in jobs))
    assert await enqueue_calls(redis) - calls == 1
    assert holders == [job.id for job in jobs]
    for job in jobs:
        # What a submitter is answered (the job it built) is what was stored.
        assert (await stored(store, job.id)).to_public() == job.to_public()


async def test_a_call_carries_a_bounded_size_of_payloads(store: Store, redis: Redis) -> None:
    await store.enqueue(new_job())
    # 1.5 MB each: two fit in the bound of one call (4 MiB), the third goes in the next.
    jobs = [new_job(payload={"s": "x" * 1_500_000}) for _ in range(3)]
    calls = await enqueue_calls(redis)
    holders = await asyncio.gather(*(store.enqueue(job) for job in jobs))
    assert await enqueue_calls(redis) - calls == 2
    assert holders == [job.id for job in jobs]


async def test_one_idempotency_key_twice_in_one_call_makes_one_job(
    store: Store, redis: Redis
) -> None:
    await store.enqueue(new_job())
    first, again, other = new_job(idempotency_key="k"), new_job(idempotency_key="k"), new_job()
    calls = await enqueue_calls(redis)
    holders = await asyncio.gather(*(store.enqueue(job) for job in (first, again, other)))
    assert await enqueue_calls(redis) - calls == 1
    assert holders == [first.id, first.id, other.id]
    assert await store.get_job(again.id, ["default"]) is None
    assert len(await indexed_ids(redis, "default")) == 3


async def test_a_refused_call_is_every_one_of_its_jobs_error(small_redis: RedisServer) -> None:
    store = Store.from_url(small_redis.url, prefix="taskd")
    redis = Redis.from_url(small_redis.url)
    try:
        await store.enqueue(new_job())
        await fill(redis)
        answers = await asyncio.gather(
            *(store.enqueue(new_job()) for _ in range(TOGETHER)), return_exceptions=True
        )
        assert all(isinstance(answer, Exception) and is_full(answer) for answer in answers)
        # The lane is free again: once Redis has room, the next submission goes.
        await redis.delete(*await redis.keys("ballast:*"))
        job = new_job()
        assert await store.enqueue(job) == job.id
    finally:
        await redis.aclose()
        await store.close()


async def test_a_caller_that_goes_cancels_neither_the_call_nor_the_others(
    proxied: Store, proxy: Proxy
) -> None:
    store = proxied
    proxy.blackhole()
    gone, kept = new_job(), new_job()
    in_flight = [asyncio.create_task(store.enqueue(job)) for job in (gone, kept)]
    await until_sent(proxy)
    # Arriving while that call is out: they wait for it to answer.
    never_sent, waiting = new_job(), new_job()
    queued = [asyncio.create_task(store.enqueue(job)) for job in (never_sent, waiting)]
    await asyncio.sleep(0)  # each task runs to its wait
    in_flight[0].cancel()
    queued[0].cancel()
    proxy.restore()
    assert await in_flight[1] == kept.id
    assert await queued[1] == waiting.id
    for task in (in_flight[0], queued[0]):
        with pytest.raises(asyncio.CancelledError):
            await task
    # The call that carried the job whose caller went ran to its end; a job whose caller
    # went before its call was sent was never sent.
    assert await store.get_job(gone.id, ["default"]) is not None
    assert await store.get_job(never_sent.id, ["default"]) is None
    for job in (kept, waiting):
        await stored(store, job.id)


async def test_a_connection_lost_mid_call_fails_each_job_of_that_call_only(
    proxied: Store, proxy: Proxy
) -> None:
    store = proxied
    proxy.blackhole()
    lost = [asyncio.create_task(store.enqueue(new_job())) for _ in range(3)]
    await until_sent(proxy)
    job = new_job()
    waiting = asyncio.create_task(store.enqueue(job))
    await asyncio.sleep(0)  # the task runs to its wait
    # As a single job's call would: each caller of the lost call gets the connection's
    # error (a 503 from the API); the job that waited goes next, on a new connection.
    proxy.reset()
    proxy.restore()
    answers = await asyncio.gather(*lost, return_exceptions=True)
    assert all(isinstance(answer, UNAVAILABLE) for answer in answers), answers
    assert await waiting == job.id
    await stored(store, job.id)


async def test_closing_the_store_answers_whoever_still_waits(proxied: Store, proxy: Proxy) -> None:
    store = proxied
    proxy.blackhole()
    tasks = [asyncio.create_task(store.enqueue(new_job())) for _ in range(3)]
    await until_sent(proxy)
    await store.close()
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(answer, UNAVAILABLE) for answer in answers), answers


async def test_a_second_call_goes_out_beside_one_held_up(proxied: Store, proxy: Proxy) -> None:
    # Behind a long round trip, the jobs that arrive during a call wait for part of it.
    store = proxied
    proxy.blackhole()
    first = asyncio.create_task(store.enqueue(new_job()))
    await until_sent(proxy)
    held = proxy.held
    await asyncio.sleep(2 * ENQUEUE_LANE_AFTER_S)
    # Too few to be worth a call of their own: they wait for the one out.
    waiting = [asyncio.create_task(store.enqueue(new_job())) for _ in range(ENQUEUE_LANE_MIN - 1)]
    await asyncio.sleep(0.2)  # time for a second call that should not go
    assert proxy.held == held
    # Enough: a second call goes beside the first.
    waiting.append(asyncio.create_task(store.enqueue(new_job())))

    async def second_sent() -> bool:
        return proxy.held > held

    await wait_until(second_sent, "a second call on its way")
    proxy.restore()
    holders = await asyncio.gather(first, *waiting)
    for job_id in holders:
        await stored(store, job_id)


async def test_closing_answers_the_jobs_of_a_sender_that_never_started(
    proxied: Store, proxy: Proxy
) -> None:
    # A second sender is made beside a call held up, and the store closes before it ran.
    store = proxied
    proxy.blackhole()
    first = asyncio.create_task(store.enqueue(new_job()))
    await until_sent(proxy)
    await asyncio.sleep(2 * ENQUEUE_LANE_AFTER_S)
    waiting = [asyncio.create_task(store.enqueue(new_job())) for _ in range(ENQUEUE_LANE_MIN)]
    await asyncio.sleep(0)  # each runs to its wait; the second sender has not started
    await store.close()
    with anyio.fail_after(5):
        answers = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert all(isinstance(answer, UNAVAILABLE) for answer in answers), answers
