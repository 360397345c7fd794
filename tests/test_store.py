"""The store's scripts on a real Redis: where a job is after each operation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from taskd.jobs import QUEUED, Job, new_id
from taskd.keys import Keys
from taskd.store import DaemonInfo, Outcome, Store

Q = "default"
ME = "daemon-a"
K = Keys("taskd")


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(redis_url, prefix="taskd")
    yield store
    await store.close()


def new_job(payload: object = None, job_type: str = "echo") -> Job:
    return Job(
        id=new_id(), type=job_type, queue=Q, payload=payload, state=QUEUED, attempts=0, created_at=1
    )


async def place(redis: Redis, job_id: str) -> list[str]:
    """Every structure of the queue that holds `job_id` (a job is in exactly one)."""
    found = []
    if job_id.encode() in await redis.lrange(K.ready(Q), 0, -1):
        found.append("ready")
    if job_id.encode() in await redis.lrange(K.landing(Q, ME), 0, -1):
        found.append("landing")
    for name, key in [
        ("active", K.active(Q, ME)),
        ("completed", K.completed(Q)),
        ("failed", K.failed(Q)),
    ]:
        if await redis.zscore(key, job_id) is not None:
            found.append(name)
    return found


async def enqueue(store: Store, count: int) -> list[Job]:
    jobs = [new_job(payload={"n": n}) for n in range(count)]
    for job in jobs:
        assert await store.enqueue(job)
    return jobs


async def test_enqueue_stores_the_record_and_queues_the_id(store: Store, redis: Redis) -> None:
    [job] = await enqueue(store, 1)
    assert await place(redis, job.id) == ["ready"]
    stored = await store.get_job(job.id, [Q])
    assert stored == job


async def test_enqueue_refuses_an_existing_id(store: Store, redis: Redis) -> None:
    [job] = await enqueue(store, 1)
    assert not await store.enqueue(job)
    assert await redis.llen(K.ready(Q)) == 1


async def test_claim_takes_the_oldest_first_up_to_the_limit(store: Store, redis: Redis) -> None:
    jobs = await enqueue(store, 5)
    claimed = await store.claim(Q, ME, 3, now=100)
    assert [j.id for j in claimed] == [j.id for j in jobs[:3]]
    assert all(j.attempts == 1 and j.state == "active" and j.started_at == 100 for j in claimed)
    assert [j.payload for j in claimed] == [{"n": 0}, {"n": 1}, {"n": 2}]
    for job in claimed:
        assert await place(redis, job.id) == ["active"]
        assert (await store.get_job(job.id, [Q])).daemon == ME  # type: ignore[union-attr]
    assert await redis.llen(K.ready(Q)) == 2


async def test_claim_of_an_empty_queue_returns_nothing(store: Store) -> None:
    assert await store.claim(Q, ME, 10, now=1) == []


async def test_blocking_fetch_lands_the_id_and_claim_takes_it_first(
    store: Store, redis: Redis
) -> None:
    first, second = await enqueue(store, 2)
    assert await store.wait_for_job(Q, ME, block_seconds=1)
    assert await place(redis, first.id) == ["landing"]

    claimed = await store.claim(Q, ME, 2, now=5)

    assert [j.id for j in claimed] == [first.id, second.id]
    assert await redis.llen(K.landing(Q, ME)) == 0


async def test_blocking_fetch_times_out_on_an_empty_queue(store: Store) -> None:
    assert not await store.wait_for_job(Q, ME, block_seconds=1)


async def test_claim_drops_ids_whose_record_is_gone(store: Store, redis: Redis) -> None:
    gone, kept = await enqueue(store, 2)
    await redis.delete(K.job(Q, gone.id))
    claimed = await store.claim(Q, ME, 2, now=1)
    assert [j.id for j in claimed] == [kept.id]
    assert await place(redis, gone.id) == []


async def test_ack_records_outcomes_and_leaves_the_active_set(store: Store, redis: Redis) -> None:
    ok, bad = await enqueue(store, 2)
    await store.claim(Q, ME, 2, now=10)
    outcomes = [Outcome(ok.id, completed=True, value=b'{"r":1}'), Outcome(bad.id, False, "boom")]

    assert await store.ack(Q, ME, outcomes, now=20) == 2

    done = await store.get_job(ok.id, [Q])
    failed = await store.get_job(bad.id, [Q])
    assert done is not None
    assert failed is not None
    assert (done.state, done.result, done.error, done.finished_at) == (
        "completed",
        {"r": 1},
        None,
        20,
    )
    assert (failed.state, failed.result, failed.error) == ("failed", None, "boom")
    assert await place(redis, ok.id) == ["completed"]
    assert await place(redis, bad.id) == ["failed"]


async def test_ack_of_a_job_no_longer_owned_changes_nothing(store: Store, redis: Redis) -> None:
    [job] = await enqueue(store, 1)
    await store.claim(Q, ME, 1, now=10)
    await redis.zrem(K.active(Q, ME), job.id)  # as if returned to its queue meanwhile

    assert await store.ack(Q, ME, [Outcome(job.id, True, b"1")], now=20) == 0
    stored = await store.get_job(job.id, [Q])
    assert stored is not None
    assert stored.state == "active"
    assert await place(redis, job.id) == []


async def test_requeue_returns_landed_and_active_jobs_to_run_next(
    store: Store, redis: Redis
) -> None:
    jobs = await enqueue(store, 4)
    await store.claim(Q, ME, 2, now=10)  # jobs 0 and 1 active
    assert await store.wait_for_job(Q, ME, block_seconds=1)  # job 2 landed

    assert await store.requeue_inflight(Q, ME) == 3

    for job in jobs:
        assert await place(redis, job.id) == ["ready"]
    returned = await store.get_job(jobs[0].id, [Q])
    assert returned is not None
    assert (returned.state, returned.attempts, returned.started_at) == ("queued", 0, None)
    # The returned jobs are taken before the one that never left the queue.
    claimed = await store.claim(Q, ME, 4, now=20)
    assert claimed[-1].id == jobs[3].id
    assert {j.id for j in claimed[:3]} == {j.id for j in jobs[:3]}


async def test_requeue_moves_more_than_one_batch(store: Store, redis: Redis) -> None:
    await enqueue(store, 1200)
    await store.claim(Q, ME, 1200, now=1)
    assert await store.requeue_inflight(Q, ME) == 1200
    assert await redis.zcard(K.active(Q, ME)) == 0
    assert await redis.llen(K.ready(Q)) == 1200


async def test_daemon_registry_and_queue_counts(store: Store) -> None:
    info = DaemonInfo(
        id=ME,
        host="h",
        pid=1,
        started_at=1,
        concurrency=4,
        queues=(Q,),
        active=1,
        last_heartbeat=1000,
    )
    await store.register_daemon(info)
    await enqueue(store, 3)
    await store.claim(Q, ME, 1, now=1)

    assert await store.live_daemons(since=1000) == [info]
    assert await store.live_daemons(since=1001) == []
    assert Q in await store.known_queues()
    counts = await store.queue_counts([Q], [info])
    assert counts == {Q: {"queued": 2, "active": 1, "completed": 0, "failed": 0}}

    await store.deregister_daemon(ME)
    assert await store.live_daemons(since=0) == []
