"""Purging a queue and retrying dead letters in bulk: the store's batches on a real Redis, and
DELETE /queues/NAME/jobs and POST /dead/retry on in-process daemons."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
from redis.asyncio import Redis

from taskd.jobs import Job
from taskd.store import Keys, Store, TypeLimits
from taskd.store.store import BATCH
from tests.builders import ended, enqueue, new_job, stored
from tests.support import ready_ids

Q = "default"
ME = "daemon-a"
K = Keys("taskd")
TYPES = (TypeLimits("echo"), TypeLimits("noop"))
TWO_AT_ONCE = (TypeLimits("slow", concurrency=2),)


async def batches(counts: AsyncIterator[int]) -> list[int]:
    return [n async for n in counts]


async def fail(store: Store, jobs: Sequence[Job], at: int, queue: str = Q) -> None:
    """Claim these queued jobs and end each attempt failed, for good, at `at`."""
    claimed = (await store.claim(queue, ME, len(jobs), now=at, type_limits=TYPES)).jobs
    assert {job.id for job in claimed} == {job.id for job in jobs}
    await store.ack(
        queue, ME, [ended(job, "failed", "boom", finished_at=at) for job in claimed], now=at
    )


async def index_ids(redis: Redis, queue: str = Q) -> set[str]:
    return {member.decode() for member in await redis.zrange(K.index(queue), 0, -1)}


# ---------------------------------------------------------------- the store


async def test_a_purge_of_queued_jobs_takes_them_from_every_place_they_wait(
    store: Store, redis: Redis
) -> None:
    # Two slow jobs start, the three others are held in their type's line.
    await store.enqueue_many([new_job("slow", n) for n in range(5)])
    claim = await store.claim(Q, ME, 5, now=5, type_limits=TWO_AT_ONCE)
    running = claim.jobs
    assert (len(running), claim.held) == (2, 3)
    # Enough to fill the inbox and spill into every priority's list.
    waiting = [new_job(payload=n, priority=n % 10) for n in range(2500)]
    keyed = new_job(idempotency_key="order-42")
    await store.enqueue_many([*waiting, keyed])
    # A blocking fetch lands an id for its next claim.
    assert await store.wait_for_job(Q, ME, block_seconds=1)
    assert len(await redis.lrange(K.landing(Q, ME), 0, -1)) == 1
    # Neither of the other states, nor another queue, is touched.
    [later] = await enqueue(store, 1, run_at=10_000)
    elsewhere = await enqueue(store, 3, queue="other")

    counts = await batches(store.purge(Q, "queued", now=6))

    assert sum(counts) == len(waiting) + 1 + 3
    assert max(counts) <= BATCH
    assert await ready_ids(redis, Q) == []
    assert await redis.llen(K.landing(Q, ME)) == 0
    assert await redis.zcard(K.limit(Q, "slow", "line")) == 0
    for job in running:
        assert (await stored(store, job.id)).state == "active"
    assert await index_ids(redis) == {later.id, *(job.id for job in running)}
    assert await store.get_job(keyed.id, [Q]) is None
    assert await redis.exists(K.idempotency_prefix(Q) + "order-42") == 0
    assert len(await ready_ids(redis, "other")) == len(elsewhere)
    # Nothing is left for a claim to start.
    assert (await store.claim(Q, ME, 10, now=7, type_limits=TYPES)).jobs == []


async def test_a_purge_deletes_no_job_that_left_the_state(store: Store, redis: Redis) -> None:
    jobs = await enqueue(store, 3)
    [started] = (await store.claim(Q, ME, 1, now=1, type_limits=TYPES)).jobs
    # Ids of jobs no longer queued, left in a ready list: a started one (as a held job's
    # wake-up call is), and one whose record is gone.
    await redis.lpush(K.inbox(Q), started.id, "0190a000-0000-7000-8000-000000000000")
    assert sum(await batches(store.purge(Q, "queued", now=2))) == 2
    assert (await stored(store, started.id)).state == "active"
    assert await ready_ids(redis, Q) == []
    assert await index_ids(redis) == {started.id}
    assert [await store.get_job(job.id, [Q]) for job in jobs[1:]] == [None, None]


async def test_a_purge_of_scheduled_jobs_leaves_the_others(store: Store, redis: Redis) -> None:
    queued = await enqueue(store, 2)
    delayed = await enqueue(store, BATCH + 10, run_at=10_000)
    assert await batches(store.purge(Q, "scheduled", now=1)) == [BATCH, 10]
    assert await redis.zcard(K.scheduled(Q)) == 0
    assert await index_ids(redis) == {job.id for job in queued}
    assert delayed[0].id not in await index_ids(redis)


async def test_a_purge_of_dead_letters_keeps_those_that_failed_after_it_began(
    store: Store, redis: Redis
) -> None:
    old, new = await enqueue(store, 1), await enqueue(store, 1)
    await fail(store, old, at=100)
    await fail(store, new, at=300)
    assert await batches(store.purge(Q, "failed", now=200)) == [1]
    assert await store.get_job(old[0].id, [Q]) is None
    assert (await stored(store, new[0].id)).state == "failed"
    assert await redis.zcard(K.failed(Q)) == 1


async def test_a_purged_dead_letter_not_yet_archived_is_kept_for_the_archive(
    redis_url: str, redis: Redis
) -> None:
    archiving = Store.from_url(redis_url, prefix="taskd", archive=True)
    try:
        [job] = await enqueue(archiving, 1)
        await fail(archiving, [job], at=100)
        assert sum(await batches(archiving.purge(Q, "failed", now=200))) == 1
    finally:
        await archiving.close()
    # The hand-off names a copy of the record as it failed, under id@finished_at.
    entry = f"{job.id}@100"
    assert await redis.zrange(K.archive(Q), 0, -1) == [entry.encode()]
    assert await redis.hexists(K.archive_kept(Q), entry)
    assert await redis.exists(K.job(Q, job.id)) == 0


async def test_a_purge_ends_though_jobs_keep_arriving(store: Store, redis: Redis) -> None:
    first = await enqueue(store, BATCH + 200)
    purging = store.purge(Q, "queued", now=1)
    assert await anext(purging) == BATCH
    # Jobs arriving meanwhile join the back of the line: the purge takes what it found.
    arrived = await enqueue(store, 2 * BATCH)
    assert await batches(purging) == [200]
    assert {i.decode() for i in await ready_ids(redis, Q)} == {job.id for job in arrived}
    assert await index_ids(redis) == {job.id for job in arrived}
    assert not {job.id for job in first} & await index_ids(redis)


async def test_a_key_whose_job_was_purged_or_deleted_makes_a_new_job(
    store: Store, redis: Redis
) -> None:
    purged, deleted = new_job(idempotency_key="a"), new_job(idempotency_key="b", run_at=9)
    await store.enqueue_many([purged, deleted])
    await batches(store.purge(Q, "queued", now=1))
    assert await store.delete(Q, deleted.id) == "scheduled"
    assert await redis.keys(K.idempotency_prefix(Q) + "*") == []
    again = [new_job(idempotency_key="a"), new_job(idempotency_key="b")]
    assert await store.enqueue_many(again) == [job.id for job in again]


# ---------------------------------------------------------------- bulk retry


async def test_a_bulk_retry_puts_back_the_dead_letters_of_a_type_across_batches(
    store: Store, redis: Redis
) -> None:
    # Two types failed in turns, so that every batch looks at both.
    jobs = [new_job("echo" if n % 2 else "noop", n, max_attempts=1) for n in range(2 * BATCH + 9)]
    await store.enqueue_many(jobs)
    for start in range(0, len(jobs), BATCH):
        await fail(store, jobs[start : start + BATCH], at=100 + start)
    echo = [job for job in jobs if job.type == "echo"]

    counts = await batches(store.retry_dead(Q, now=5000, job_type="echo"))

    assert sum(counts) == len(echo)
    assert max(counts) <= BATCH
    back = await stored(store, echo[0].id)
    assert (back.state, back.attempts, back.earlier_attempts, back.run_at) == (
        "queued", 0, 1, 5000,
    )  # fmt: skip
    assert [entry["outcome"] for entry in back.history] == ["failed"]
    assert await redis.zcard(K.failed(Q)) == len(jobs) - len(echo)
    assert len(await ready_ids(redis, Q)) == len(echo)
    noop = await stored(store, jobs[0].id)
    assert (noop.type, noop.state) == ("noop", "failed")


async def test_a_bulk_retry_leaves_what_failed_after_it_began_and_survives_a_lost_place(
    store: Store, redis: Redis
) -> None:
    jobs = [new_job("echo" if n % 2 else "noop", n) for n in range(2 * BATCH)]
    await store.enqueue_many(jobs)
    await fail(store, jobs[:BATCH], at=100)
    await fail(store, jobs[BATCH:], at=200)
    retrying = store.retry_dead(Q, now=150, job_type="echo")
    assert await anext(retrying) == BATCH // 2
    # The dead letter it stopped at goes (as do all of its type): it goes on all the same.
    for job in jobs[:BATCH]:
        if job.type == "noop":
            assert await store.delete(Q, job.id) == "failed"
    assert await batches(retrying) == [0]
    # Those that failed after the retry began stay dead.
    assert await redis.zcard(K.failed(Q)) == BATCH
    assert sum(await batches(store.retry_dead(Q, now=250))) == BATCH
    assert await redis.zcard(K.failed(Q)) == 0


async def test_a_bulk_retry_keeps_a_record_not_yet_archived_for_the_archive(
    redis_url: str, redis: Redis
) -> None:
    archiving = Store.from_url(redis_url, prefix="taskd", archive=True)
    try:
        [job] = await enqueue(archiving, 1)
        await fail(archiving, [job], at=100)
        assert await batches(archiving.retry_dead(Q, now=200)) == [1]
    finally:
        await archiving.close()
    assert await redis.hexists(K.archive_kept(Q), f"{job.id}@100")
    assert await redis.hget(K.job(Q, job.id), "state") == b"queued"


@pytest.mark.parametrize("state", ["queued", "scheduled", "failed"])
async def test_an_empty_state_purges_nothing_in_one_call(store: Store, state: str) -> None:
    assert await batches(store.purge(Q, state, now=1)) == [0]
    assert await batches(store.retry_dead(Q, now=1)) == [0]
