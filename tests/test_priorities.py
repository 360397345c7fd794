"""Priorities: a claim starts a queue's highest-priority ready job first, on one or more daemons."""

from __future__ import annotations

import random
from datetime import datetime

import aiohttp
import anyio
from redis.asyncio import Redis

from taskd.jobs import Job, new_id
from taskd.store import Keys, Store
from tests.builders import new_job
from tests.support import (
    ECHO,
    base_url,
    make_config,
    post_json,
    ready_ids,
    running_daemon,
    two_daemons,
    wait_for_state,
)

Q = "default"
K = Keys("taskd")


async def test_claims_take_the_highest_priority_first_and_the_oldest_within_one(
    store: Store,
) -> None:
    # More jobs than the inbox holds, so that both the inbox and the priority lists are used.
    rng = random.Random(7)
    jobs = [new_job(payload={"n": n}, priority=rng.randrange(10)) for n in range(1500)]
    assert await store.enqueue_many(jobs) == [j.id for j in jobs]
    taken: list[Job] = []
    while claimed := (
        await store.claim(Q, "d", rng.randrange(1, 40), now=2, type_limits=ECHO)
    ).jobs:
        taken += claimed
    expected = sorted(jobs, key=lambda j: (-j.priority, j.payload["n"]))
    assert [j.payload["n"] for j in taken] == [j.payload["n"] for j in expected]


async def test_a_new_higher_priority_job_goes_before_a_backlog(store: Store) -> None:
    await store.enqueue_many([new_job(payload={"n": n}, priority=5) for n in range(1200)])
    await store.claim(Q, "d", 10, now=2, type_limits=ECHO)
    urgent = new_job(payload={"n": 0}, priority=9)
    await store.enqueue(urgent)
    [first] = (await store.claim(Q, "d", 1, now=3, type_limits=ECHO)).jobs
    assert first.id == urgent.id
    background = new_job(payload={"n": 0}, priority=0)
    await store.enqueue(background)
    rest = []
    while claimed := (await store.claim(Q, "d", 500, now=4, type_limits=ECHO)).jobs:
        rest += claimed
    assert len(rest) == 1191
    assert rest[-1].id == background.id


async def test_an_idle_daemon_is_woken_by_a_job_of_any_priority(store: Store) -> None:
    for priority in (0, 9, 5):
        assert (await store.claim(Q, "d", 10, now=1, type_limits=ECHO)).jobs == []
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.wait_for_job, Q, "d", 5)
                await anyio.wait_all_tasks_blocked()
                new = new_job(payload={"n": 0}, priority=priority)
                await store.enqueue(new)
        [claimed] = (await store.claim(Q, "d", 10, now=2, type_limits=ECHO)).jobs
        assert claimed.id == new.id
        assert claimed.attempts == 1


async def test_leftovers_of_a_claim_stay_where_a_blocked_daemon_gets_them(
    store: Store, redis: Redis
) -> None:
    # Daemon a found the queue empty and is about to block; meanwhile daemon b claims one
    # job of a burst. The rest must still wake a blocked daemon, not sit unseen.
    await store.enqueue_many([new_job(payload={"n": n}, priority=n % 10) for n in range(50)])
    assert len((await store.claim(Q, "b", 1, now=2, type_limits=ECHO)).jobs) == 1
    with anyio.fail_after(5):
        assert await store.wait_for_job(Q, "a", 5)
    claimed = (await store.claim(Q, "a", 100, now=3, type_limits=ECHO)).jobs
    assert len(claimed) == 49
    assert [j.priority for j in claimed] == sorted((j.priority for j in claimed), reverse=True)
    assert await ready_ids(redis, Q) == []


async def test_a_claim_that_empties_the_inbox_leaves_the_backlog_where_daemons_block(
    store: Store, redis: Redis
) -> None:
    # A claim puts back what it did not take: the best 16 in the inbox, the rest in their
    # priority's list. A next claim that takes just the inbox's must not leave it empty
    # with a backlog behind it: jobs that arrive then join the backlog, and a daemon
    # blocked on the empty inbox would sleep through them (5 s, under load, before this
    # was fixed). Daemon b takes 2 of a burst of 20, then 16; daemon a, about to block,
    # must find the last 2 and, after them, the job that arrives meanwhile.
    burst = [new_job(payload={"n": n}) for n in range(20)]
    await store.enqueue_many(burst)
    assert len((await store.claim(Q, "b", 2, now=2, type_limits=ECHO)).jobs) == 2
    assert len((await store.claim(Q, "b", 16, now=3, type_limits=ECHO)).jobs) == 16
    late = new_job(payload={"n": 20})
    await store.enqueue(late)
    with anyio.fail_after(5):
        assert await store.wait_for_job(Q, "a", 2)
    claimed = (await store.claim(Q, "a", 100, now=4, type_limits=ECHO)).jobs
    assert [j.id for j in claimed] == [j.id for j in burst[18:]] + [late.id]


async def test_returned_and_promoted_jobs_keep_their_priority(store: Store) -> None:
    low, high = new_job(payload={"n": 0}, priority=1), new_job(payload={"n": 0}, priority=8)
    await store.enqueue_many([low, high])
    claimed = (await store.claim(Q, "d", 2, now=2, type_limits=ECHO)).jobs
    assert [j.id for j in claimed] == [high.id, low.id]
    assert await store.requeue_inflight(Q, "d", now=3) == 2
    assert [j.id for j in (await store.claim(Q, "d", 2, now=4, type_limits=ECHO)).jobs] == [
        high.id,
        low.id,
    ]
    later = Job(new_id(), "echo", Q, None, "scheduled", 0, 1, run_at=10, priority=9)
    await store.enqueue(later)
    await store.requeue_inflight(Q, "d", now=5)
    assert await store.promote(Q, now=10) == (1, None)
    order = [j.id for j in (await store.claim(Q, "d", 3, now=11, type_limits=ECHO)).jobs]
    assert order[-1] == low.id
    assert set(order[:2]) == {high.id, later.id}


async def test_cancel_and_delete_find_a_job_in_its_priority_list(
    store: Store, redis: Redis
) -> None:
    # The last ones wait in the list of priority 3.
    jobs = [new_job(payload={"n": n}, priority=3) for n in range(1100)]
    await store.enqueue_many(jobs)
    assert await redis.llen(K.priority_list(Q, 3)) == 100
    assert await store.cancel(Q, jobs[-1].id, now=2) == "queued"
    assert await store.delete(Q, jobs[-2].id) == "queued"
    assert await store.cancel(Q, jobs[0].id, now=2) == "queued"
    remaining = set(await ready_ids(redis, Q))
    assert len(remaining) == 1097
    assert not {j.id.encode() for j in (jobs[0], jobs[-2], jobs[-1])} & remaining


async def test_two_daemons_start_the_highest_priority_jobs_first(redis_url: str) -> None:
    config = make_config(redis_url, workers={"concurrency": 1})
    rng = random.Random(3)
    async with two_daemons(config) as (session, (one, two), urls):
        await post_json(session, f"{urls[0]}/queues/default/pause", {})
        ids = []
        for n in range(24):
            body = {
                "type": "sleep",
                "payload": {"seconds": 0.05},
                "priority": rng.choice([0, 5, 9]),
            }
            status, job = await post_json(session, f"{urls[n % 2]}/jobs", body)
            assert status == 201
            ids.append(job["id"])
        await post_json(session, f"{urls[1]}/queues/default/resume", {})
        jobs = [await wait_for_state(session, urls[0], i, {"completed"}) for i in ids]
    assert {j["daemon"] for j in jobs} == {one.identity.id, two.identity.id}
    started = {j["id"]: parse_time(j["started_at"]) for j in jobs}
    # Two daemons claim at once, so a start can precede the start of a job claimed just
    # before it by a few milliseconds; jobs run 50 ms, so a wrong order shows far more.
    for high in jobs:
        for low in jobs:
            if high["priority"] > low["priority"]:
                assert started[high["id"]] <= started[low["id"]] + 0.025, (high, low)


async def test_idle_daemons_start_a_job_of_any_priority_at_once(redis_url: str) -> None:
    config = make_config(redis_url)
    async with (
        running_daemon(config) as one,
        running_daemon(config),
        aiohttp.ClientSession() as session,
    ):
        url = base_url(one)
        for priority in (0, 9, 3):
            _, job = await post_json(session, f"{url}/jobs", {"type": "noop", "priority": priority})
            done = await wait_for_state(session, url, job["id"], {"completed"})
            # Far below the blocking fetch's timeout (5 s): the job woke a daemon.
            waited = parse_time(done["started_at"]) - parse_time(done["created_at"])
            assert waited < 1.0, done
            assert done["priority"] == priority


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()
