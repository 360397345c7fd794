"""The store's scripts on a real Redis: where a job is, and what its record says, after each."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from redis import exceptions as redis_exceptions
from redis.asyncio import Redis

from taskd.jobs import Job
from taskd.store import Beat, ClaimRequest, DaemonInfo, Inspector, Keys, Store
from taskd.store.record import OLDEST_RECORD_VERSION, RECORD_VERSION
from tests.builders import done, ended, enqueue, new_job, stored
from tests.support import ECHO, indexed_ids, ready_ids

Q = "default"
ME = "daemon-a"
K = Keys("taskd")


async def place(redis: Redis, job_id: str, daemon: str = ME) -> list[str]:
    """Every structure of the queue that holds `job_id`: a job is in exactly one."""
    found = []
    if job_id.encode() in await ready_ids(redis, Q):
        found.append("ready")
    if job_id.encode() in await redis.lrange(K.landing(Q, daemon), 0, -1):
        found.append("landing")
    for name, key in [
        ("active", K.active(Q, daemon)),
        ("scheduled", K.scheduled(Q)),
        ("completed", K.completed(Q)),
        ("failed", K.failed(Q)),
        ("cancelled", K.cancelled(Q)),
    ]:
        if await redis.zscore(key, job_id) is not None:
            found.append(name)
    return found


async def test_enqueue_queues_or_schedules(store: Store, redis: Redis) -> None:
    [now] = await enqueue(store, 1)
    [later] = await enqueue(store, 1, run_at=5000)
    assert await place(redis, now.id) == ["ready"]
    assert await place(redis, later.id) == ["scheduled"]
    assert await stored(store, now.id) == now
    assert (await stored(store, later.id)).run_at == 5000
    assert await store.enqueue(now) == now.id  # the same id again changes nothing
    assert len(await ready_ids(redis, Q)) == 1


async def test_claim_takes_the_oldest_first_up_to_the_limit(store: Store, redis: Redis) -> None:
    jobs = await enqueue(store, 5)
    claimed = (await store.claim(Q, ME, 3, now=100, type_limits=ECHO)).jobs
    assert [j.id for j in claimed] == [j.id for j in jobs[:3]]
    assert [j.payload for j in claimed] == [{"n": 0}, {"n": 1}, {"n": 2}]
    for job in claimed:
        assert (job.attempts, job.max_attempts, job.started_at) == (1, 3, 100)
        assert await place(redis, job.id) == ["active"]
        assert (await stored(store, job.id)).daemon == ME
    assert await redis.zscore(K.leases(Q), ME) == 100
    assert (await store.claim(Q, ME, 10, now=1, type_limits=ECHO)).jobs != []
    assert (await store.claim(Q, ME, 10, now=1, type_limits=ECHO)).jobs == []


async def test_blocking_fetch_lands_the_id_and_claim_takes_it_first(
    store: Store, redis: Redis
) -> None:
    first, second = await enqueue(store, 2)
    assert await store.wait_for_job(Q, ME, block_seconds=1)
    assert await place(redis, first.id) == ["landing"]
    claimed = (await store.claim(Q, ME, 2, now=5, type_limits=ECHO)).jobs
    assert [j.id for j in claimed] == [first.id, second.id]
    assert not await store.wait_for_job(Q, ME, block_seconds=1)


async def test_claim_skips_ids_of_jobs_no_longer_queued(store: Store, redis: Redis) -> None:
    gone, cancelled, kept = await enqueue(store, 3)
    await redis.delete(K.job(Q, gone.id))
    assert await store.wait_for_job(Q, ME, block_seconds=1)  # `gone` lands here...
    assert await store.cancel(Q, cancelled.id, now=2) == "queued"
    claimed = (await store.claim(Q, ME, 3, now=3, type_limits=ECHO)).jobs
    assert [j.id for j in claimed] == [kept.id]
    assert await place(redis, cancelled.id) == ["cancelled"]


async def test_ack_records_each_outcome(store: Store, redis: Redis) -> None:
    jobs = await enqueue(store, 4)
    ok, retry, dead, stop = (await store.claim(Q, ME, 4, now=10, type_limits=ECHO)).jobs
    attempts = [
        ended(ok, "completed", '{"r":1}', finished_at=15),
        ended(retry, "retry", "flaky", retry_at=500, finished_at=16),
        ended(dead, "failed", "boom"),
        ended(stop, "cancelled", "cancelled while running"),
    ]
    assert await store.ack(Q, ME, attempts, now=20) == [True] * 4

    done = await stored(store, ok.id)
    # Finished when its attempt ended, not when the ack reached Redis.
    assert (done.state, done.result, done.error, done.finished_at) == (
        "completed",
        {"r": 1},
        None,
        15,
    )
    waiting = await stored(store, retry.id)
    assert (waiting.state, waiting.run_at, waiting.error, waiting.started_at) == (
        "scheduled", 500, "flaky", None,
    )  # fmt: skip
    assert (await stored(store, dead.id)).state == "failed"
    assert (await stored(store, stop.id)).state == "cancelled"
    places = [await place(redis, j.id) for j in jobs]
    assert places == [["completed"], ["scheduled"], ["failed"], ["cancelled"]]
    # Each attempt's history entry: the daemon, when it started and ended, and how.
    assert done.history == (
        {"attempt": 1, "daemon": ME, "started_at": 10, "finished_at": 15,
         "outcome": "completed", "error": None},
    )  # fmt: skip
    assert waiting.history == (
        {"attempt": 1, "daemon": ME, "started_at": 10, "finished_at": 16,
         "outcome": "retry", "error": "flaky"},
    )  # fmt: skip
    totals = await redis.hgetall(K.totals(Q))
    assert totals == {
        b"enqueued": b"4",
        b"completed": b"1",
        b"retried": b"1",
        b"failed": b"1",
        b"cancelled": b"1",
    }


async def test_ack_and_claim_records_the_acks_then_claims_in_the_slots_they_free(
    store: Store, redis: Redis
) -> None:
    jobs = await enqueue(store, 5)
    first = (await store.claim(Q, ME, 2, now=10, type_limits=ECHO)).jobs
    request = ClaimRequest(2, 20, ECHO, {})
    flags, claimed = await store.ack_and_claim(Q, ME, [done(job) for job in first], request)
    assert flags == [True, True]
    assert [job.id for job in claimed.jobs] == [job.id for job in jobs[2:4]]
    assert [await place(redis, job.id) for job in jobs] == [
        ["completed"], ["completed"], ["active"], ["active"], ["ready"],
    ]  # fmt: skip
    # An attempt no longer this daemon's is refused as by ack(); the claim runs all the same.
    flags, claimed = await store.ack_and_claim(Q, ME, [done(first[0])], request)
    assert flags == [False]
    assert [job.id for job in claimed.jobs] == [jobs[4].id]


class BrokenClaims(Store):
    """A store whose claims fail in Redis (a script error), acks not."""

    def _claim_call(self, *args: Any) -> tuple[list[str], list[Any]]:
        keys, args_ = super()._claim_call(*args)
        return keys[:1], args_  # the script's other keys missing: it fails


async def test_ack_and_claim_records_the_ack_when_only_the_claim_fails(
    store: Store, redis: Redis
) -> None:
    await enqueue(store, 2)
    [job] = (await store.claim(Q, ME, 1, now=10, type_limits=ECHO)).jobs
    broken = BrokenClaims(connection=store.connection)
    flags, claimed = await broken.ack_and_claim(Q, ME, [done(job)], ClaimRequest(1, 20, ECHO, {}))
    assert flags == [True]
    assert isinstance(claimed, redis_exceptions.ResponseError)
    assert await place(redis, job.id) == ["completed"]


async def test_ack_and_claim_loads_its_scripts_again_after_a_script_flush(
    store: Store, redis: Redis
) -> None:
    jobs = await enqueue(store, 2)
    [job] = (await store.claim(Q, ME, 1, now=10, type_limits=ECHO)).jobs
    await redis.script_flush()  # as a Redis restarted without its scripts
    flags, claimed = await store.ack_and_claim(Q, ME, [done(job)], ClaimRequest(1, 20, ECHO, {}))
    assert flags == [True]
    assert [each.id for each in claimed.jobs] == [jobs[1].id]
    assert await place(redis, job.id) == ["completed"]


async def test_enqueue_claim_and_ack_load_their_scripts_again_after_a_script_flush(
    store: Store, redis: Redis
) -> None:
    await redis.script_flush()
    [job] = await enqueue(store, 1)
    await redis.script_flush()
    [claimed] = (await store.claim(Q, ME, 1, now=10, type_limits=ECHO)).jobs
    await redis.script_flush()
    assert await store.ack(Q, ME, [done(claimed)], now=11) == [True]
    assert await place(redis, job.id) == ["completed"]


async def test_history_grows_one_entry_per_attempt(store: Store) -> None:
    [job] = await enqueue(store, 1)
    [first] = (await store.claim(Q, ME, 1, now=1, type_limits=ECHO)).jobs
    await store.ack(Q, ME, [ended(first, "retry", "flaky", retry_at=2)], now=1)
    await store.promote(Q, now=2)
    [second] = (await store.claim(Q, ME, 1, now=3, type_limits=ECHO)).jobs
    await store.ack(Q, ME, [ended(second, "completed", "null")], now=4)
    history = (await stored(store, job.id)).history
    assert [(e["attempt"], e["outcome"]) for e in history] == [(1, "retry"), (2, "completed")]


async def failed_once(store: Store) -> tuple[Job, dict[str, object]]:
    """A job that failed for good on its first attempt (1 to 3 ms), and that attempt's entry."""
    [job] = await enqueue(store, 1)
    [first] = (await store.claim(Q, ME, 1, now=1, type_limits=ECHO)).jobs
    await store.ack(Q, ME, [ended(first, "failed", "boom", finished_at=3)], now=4)
    entry = {"attempt": 1, "daemon": ME, "started_at": 1, "finished_at": 3,
             "outcome": "failed", "error": "boom"}  # fmt: skip
    return job, entry


async def test_the_entry_of_the_attempt_that_ended_a_job_is_implied_by_its_record(
    store: Store, redis: Redis
) -> None:
    job, expected = await failed_once(store)
    # Not written (the record says it all), yet read as the last entry.
    assert await redis.hget(K.job(Q, job.id), "history") is None
    assert (await stored(store, job.id)).history == (expected,)
    # Retried by hand, the job leaves its final state: the entry is written then.
    assert await store.retry(Q, job.id, now=5) == "failed"
    again = await stored(store, job.id)
    assert (again.state, again.started_at, again.history) == ("queued", None, (expected,))
    [second] = (await store.claim(Q, ME, 1, now=6, type_limits=ECHO)).jobs
    await store.ack(Q, ME, [ended(second, "completed", "null", finished_at=7)], now=8)
    outcomes = [(e["attempt"], e["outcome"]) for e in (await stored(store, job.id)).history]
    assert outcomes == [(1, "failed"), (1, "completed")]  # attempts start over on a retry


async def test_a_retry_by_hand_starts_attempts_over_but_not_the_attempt_number(
    store: Store, redis: Redis
) -> None:
    [job] = await enqueue(store, 1, max_attempts=2)
    numbers = []
    for now in (1, 10):  # two lives of two attempts each, the first ending in a retry
        [first] = (await store.claim(Q, ME, 1, now=now, type_limits=ECHO)).jobs
        await store.ack(Q, ME, [ended(first, "retry", "flaky", retry_at=now + 1)], now=now)
        await store.promote(Q, now + 1)
        [second] = (await store.claim(Q, ME, 1, now=now + 2, type_limits=ECHO)).jobs
        await store.ack(Q, ME, [ended(second, "failed", "boom")], now=now + 3)
        numbers += [(j.attempts, j.attempt_number) for j in (first, second)]
        assert await store.retry(Q, job.id, now=now + 4) == "failed"
    assert numbers == [(1, 1), (2, 2), (1, 3), (2, 4)]
    back = await stored(store, job.id)
    assert (back.attempts, back.earlier_attempts, back.attempt_number) == (0, 4, 4)
    assert len(back.history) == back.attempt_number  # every attempt it had, counted
    # Absent while at 0, as attempts is: a job never retried by hand has no such field.
    [fresh] = await enqueue(store, 1)
    await store.claim(Q, ME, 1, now=20, type_limits=ECHO)
    assert await redis.hget(K.job(Q, fresh.id), "earlier_attempts") is None


async def test_ack_of_an_attempt_no_longer_owned_changes_nothing(
    store: Store, redis: Redis
) -> None:
    [job] = await enqueue(store, 1)
    [claimed] = (await store.claim(Q, ME, 1, now=10, type_limits=ECHO)).jobs
    await redis.zrem(K.active(Q, ME), job.id)  # taken back meanwhile
    assert await store.ack(Q, ME, [ended(claimed, "completed", "1")], now=20) == [False]
    assert (await stored(store, job.id)).state == "active"


async def test_ack_of_an_older_attempt_changes_nothing(store: Store) -> None:
    [job] = await enqueue(store, 1)
    [first] = (await store.claim(Q, ME, 1, now=10, type_limits=ECHO)).jobs
    await store.recover(Q, ME, now=11, before=11)  # taken back...
    [second] = (await store.claim(Q, ME, 1, now=12, type_limits=ECHO)).jobs  # ...and claimed again
    assert await store.ack(Q, ME, [ended(first, "completed", "1")], now=20) == [False]
    assert await store.ack(Q, ME, [ended(second, "completed", "2")], now=21) == [True]
    assert (await stored(store, job.id)).result == 2


async def test_requeue_returns_unfinished_jobs_to_run_next(store: Store, redis: Redis) -> None:
    jobs = await enqueue(store, 5)
    await store.claim(Q, ME, 3, now=10, type_limits=ECHO)  # jobs 0-2 active
    assert await store.cancel(Q, jobs[2].id, now=11) == "active"
    assert await store.wait_for_job(Q, ME, block_seconds=1)  # job 3 landed

    assert await store.requeue_inflight(Q, ME, now=12) == 4

    assert [await place(redis, j.id) for j in jobs] == [["ready"]] * 2 + [["cancelled"]] + [
        ["ready"]
    ] * 2
    back = await stored(store, jobs[0].id)
    assert (back.state, back.attempts, back.started_at) == ("queued", 0, None)
    claimed = (await store.claim(Q, ME, 4, now=20, type_limits=ECHO)).jobs
    assert claimed[-1].id == jobs[4].id  # the returned ones run before it


async def test_requeue_moves_more_than_one_batch(store: Store, redis: Redis) -> None:
    await enqueue(store, 1200)
    await store.claim(Q, ME, 1200, now=1, type_limits=ECHO)
    assert await store.requeue_inflight(Q, ME, now=2) == 1200
    assert len(await ready_ids(redis, Q)) == 1200


async def test_promote_moves_due_jobs_only_and_tells_the_next_due(
    store: Store, redis: Redis
) -> None:
    early, due, later = [new_job(run_at=t) for t in (100, 200, 300)]
    for job in (later, due, early):
        await store.enqueue(job)
    assert await store.promote(Q, now=200) == (2, 300)
    assert await redis.lrange(K.inbox(Q), 0, -1) == [due.id.encode(), early.id.encode()]
    assert (await stored(store, early.id)).state == "queued"
    assert await store.promote(Q, now=250) == (0, 300)
    assert await store.promote(Q, now=300) == (1, None)


async def test_concurrent_promoters_move_each_job_once(redis_url: str, redis: Redis) -> None:
    stores = [Store.from_url(redis_url, prefix="taskd") for _ in range(4)]
    try:
        await enqueue(stores[0], 2000, run_at=100)
        async with anyio.create_task_group() as tg:
            for s in stores:
                for _ in range(5):
                    tg.start_soon(s.promote, Q, 100)
        ready = await ready_ids(redis, Q)
        assert await redis.zcard(K.scheduled(Q)) == 0
    finally:
        for s in stores:
            await s.close()
    assert len(ready) == len(set(ready)) == 2000


async def test_cancel_by_state(store: Store, redis: Redis) -> None:
    active, done = await enqueue(store, 2)
    await store.claim(Q, ME, 2, now=1, type_limits=ECHO)
    await store.ack(Q, ME, [ended(await stored(store, done.id), "completed", "1")], now=2)
    [queued] = await enqueue(store, 1)
    [scheduled] = await enqueue(store, 1, run_at=10_000)

    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(K.cancel_channel)
        assert await store.cancel(Q, active.id, now=3) == "active"
        message = None
        while message is None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message["data"] == active.id.encode()
    assert (await stored(store, active.id)).cancel_requested
    assert await place(redis, active.id) == ["active"]

    assert await store.cancel(Q, queued.id, now=3) == "queued"
    assert await store.cancel(Q, scheduled.id, now=3) == "scheduled"
    assert await store.cancel(Q, done.id, now=3) == "completed"
    assert await store.cancel(Q, "nope", now=3) == "missing"
    assert await place(redis, queued.id) == ["cancelled"]
    assert await place(redis, scheduled.id) == ["cancelled"]
    assert (await stored(store, scheduled.id)).state == "cancelled"


async def test_retry_puts_a_failed_job_back_with_attempts_reset(store: Store, redis: Redis) -> None:
    [job] = await enqueue(store, 1)
    [claimed] = (await store.claim(Q, ME, 1, now=1, type_limits=ECHO)).jobs
    await store.ack(Q, ME, [ended(claimed, "failed", "boom")], now=2)
    assert await store.retry(Q, job.id, now=7) == "failed"
    back = await stored(store, job.id)
    assert (back.state, back.attempts, back.error, back.finished_at) == ("queued", 0, None, None)
    assert back.run_at == 7  # due again from the retry: its wait counts from there
    assert await place(redis, job.id) == ["ready"]
    assert await store.retry(Q, job.id, now=8) == "queued"  # not failed: nothing changes
    [again] = (await store.claim(Q, ME, 1, now=10, type_limits=ECHO)).jobs
    assert again.waited_ms == 3


async def test_delete_removes_a_job_wherever_it_waits(store: Store, redis: Redis) -> None:
    [active] = await enqueue(store, 1)
    await store.claim(Q, ME, 1, now=1, type_limits=ECHO)
    [queued] = await enqueue(store, 1)
    [scheduled] = await enqueue(store, 1, run_at=10_000)
    assert await store.delete(Q, active.id) == "active"
    assert await store.delete(Q, queued.id) == "queued"
    assert await store.delete(Q, scheduled.id) == "scheduled"
    assert await store.delete(Q, scheduled.id) == "missing"
    assert await place(redis, queued.id) == []
    assert await place(redis, scheduled.id) == []
    assert await place(redis, active.id) == ["active"]
    assert len(await indexed_ids(redis, Q)) == 1


async def test_recover_takes_back_the_jobs_of_a_lapsed_lease(store: Store, redis: Redis) -> None:
    jobs = await enqueue(store, 5, max_attempts=2)
    await store.claim(Q, ME, 3, now=100, type_limits=ECHO)
    poison = jobs[2]
    await redis.hset(K.job(Q, poison.id), "attempts", 2)  # its last attempt
    assert await store.cancel(Q, jobs[1].id, now=100) == "active"
    assert await store.wait_for_job(Q, ME, block_seconds=1)  # jobs[3] landed

    assert await store.recover(Q, ME, now=200, before=101) == 4

    assert [await place(redis, j.id) for j in jobs] == [
        ["ready"], ["cancelled"], ["failed"], ["ready"], ["ready"],
    ]  # fmt: skip
    lost = await stored(store, jobs[0].id)
    assert (lost.state, lost.attempts) == ("queued", 1)
    assert lost.history[0]["outcome"] == "lost"
    assert "died during attempt 1" in (lost.error or "")
    dead = await stored(store, poison.id)
    assert dead.state == "failed"
    assert "its last" in (dead.error or "")
    assert await redis.zscore(K.leases(Q), ME) is None
    assert await redis.hget(K.totals(Q), "recovered") == b"3"


async def test_recover_leaves_a_live_lease_alone(store: Store, redis: Redis) -> None:
    [job] = await enqueue(store, 1)
    await store.claim(Q, ME, 1, now=100, type_limits=ECHO)
    assert await store.stale_leases(Q, before=100) == []
    assert await store.stale_leases(Q, before=101) == [ME]
    assert await store.recover(Q, ME, now=200, before=100) == -1
    assert await place(redis, job.id) == ["active"]


async def test_trim_deletes_jobs_past_their_retention(store: Store, redis: Redis) -> None:
    jobs = await enqueue(store, 3)
    claimed = (await store.claim(Q, ME, 3, now=1, type_limits=ECHO)).jobs
    for n, job in enumerate(claimed):
        await store.ack(Q, ME, [ended(job, "completed", "1")], now=10 * (n + 1))
    assert await store.trim(Q, "completed", cutoff=20) == 2
    assert await store.get_job(jobs[0].id, [Q]) is None
    assert await store.get_job(jobs[2].id, [Q]) is not None
    assert len(await indexed_ids(redis, Q)) == 1
    assert await redis.zcard(K.completed(Q)) == 1


def info(daemon_id: str, beat: int) -> DaemonInfo:
    return DaemonInfo(daemon_id, "h", 1, 1, 4, (Q,), 0, beat)


async def test_beat_registers_and_tells_when_the_daemon_was_forgotten(
    store: Store, inspector: Inspector
) -> None:
    new = RECORD_VERSION
    assert await store.beat(info(ME, 1000)) == Beat(
        registered=False, marked=False, record_version=new
    )
    assert await store.beat(info(ME, 2000)) == Beat(
        registered=True, marked=True, record_version=new
    )
    assert await inspector.live_daemons(since=2000) == [info(ME, 2000)]
    assert await store.stale_daemons(before=2001) == [ME]
    assert not await store.forget_daemon(ME, before=2000)  # it beat at 2000
    assert await store.forget_daemon(ME, before=2001)
    # Forgotten: the beat says so; the installation's marker is still there.
    assert await store.beat(info(ME, 3000)) == Beat(
        registered=False, marked=True, record_version=new
    )


async def _id_and_queue(redis: Redis, job: Job) -> list[bytes | None]:
    return list(await redis.hmget(K.job(Q, job.id), ["id", "queue"]))


async def test_records_keep_id_and_queue_while_a_registered_daemon_reads_them(
    store: Store, redis: Redis
) -> None:
    # Until a heartbeat has found what the registered daemons read, the two are written.
    store.record_version = OLDEST_RECORD_VERSION  # as a daemon's store starts
    [first] = await enqueue(store, 1)
    assert await _id_and_queue(redis, first) == [first.id.encode(), Q.encode()]
    assert (await store.beat(info(ME, 1000))).record_version == RECORD_VERSION
    [lean] = await enqueue(store, 1)
    assert await _id_and_queue(redis, lean) == [None, None]
    # Read from the key, as every reader of this taskd does.
    assert (await stored(store, lean.id)).to_public() == lean.to_public()
    # A daemon of an older taskd registers, as its heartbeat would (its record does not
    # say which layout it reads): they are written again from the next beat on.
    await redis.hset(K.daemon("old"), mapping={"id": "old", "queues": f'["{Q}"]'})
    await redis.zadd(K.daemons, {"old": 1500})
    assert (await store.beat(info(ME, 2000))).record_version == 1
    [kept] = await enqueue(store, 1)
    assert await _id_and_queue(redis, kept) == [kept.id.encode(), Q.encode()]
    # Once it has left the registry (its jobs reaped), they are not.
    assert await store.forget_daemon("old", before=1600)
    assert (await store.beat(info(ME, 3000))).record_version == RECORD_VERSION
    [lean_again] = await enqueue(store, 1)
    assert await _id_and_queue(redis, lean_again) == [None, None]
    # What a daemon that left the registry said goes at the next beat, also while one that
    # says nothing is registered.
    await store.beat(info("gone", 3000))
    assert await store.forget_daemon("gone", before=3500)
    await redis.zadd(K.daemons, {"old": 3600})
    await store.beat(info(ME, 4000))
    assert await redis.hkeys(K.record_versions) == [ME.encode()]


async def test_new_jobs_go_to_the_sorted_set_while_a_daemon_reading_only_it_is_registered(
    store: Store, redis: Redis, inspector: Inspector
) -> None:
    assert (await store.beat(info(ME, 1000))).record_version == RECORD_VERSION
    [paged] = await enqueue(store, 1)
    # A daemon of the taskd before the paged index (layout 2) registers.
    await store.beat(info("mid", 1000))
    await redis.hset(K.record_versions, "mid", 2)
    assert (await store.beat(info(ME, 2000))).record_version == 2
    [listed] = await enqueue(store, 1)
    assert await redis.zrange(K.index(Q), 0, -1) == [listed.id.encode()]
    assert await _id_and_queue(redis, listed) == [None, None]
    # This taskd lists, and deletes, the jobs of either index.
    page = await inspector.list_jobs([Q], state=None, job_type=None, limit=10, cursor=None)
    assert [job.id for job in page.jobs] == [listed.id, paged.id]
    assert await store.delete(Q, listed.id) == "queued"
    assert await store.delete(Q, paged.id) == "queued"
    assert await indexed_ids(redis, Q) == []
    assert await redis.exists(K.index(Q), K.pages(Q)) == 0
    # Once it has left the registry, new jobs go to pages again.
    assert await store.forget_daemon("mid", before=1600)
    assert (await store.beat(info(ME, 3000))).record_version == RECORD_VERSION
    [again] = await enqueue(store, 1)
    assert await redis.exists(K.index(Q)) == 0
    assert await indexed_ids(redis, Q) == [again.id]


async def test_queue_counts_and_totals(store: Store, inspector: Inspector) -> None:
    await store.beat(info(ME, 1))
    await enqueue(store, 3)
    await enqueue(store, 1, run_at=10_000)
    [claimed, _] = (await store.claim(Q, ME, 2, now=1, type_limits=ECHO)).jobs
    await store.ack(Q, ME, [ended(claimed, "failed", "x")], now=2)
    counts = await inspector.queue_counts([Q])
    assert counts[Q] == {
        "queued": 1,
        "scheduled": 1,
        "active": 1,
        "completed": 0,
        "failed": 1,
        "cancelled": 0,
        # Every counter, those still at 0 too.
        "totals": {
            "enqueued": 4,
            "completed": 0,
            "retried": 0,
            "failed": 1,
            "cancelled": 0,
            "recovered": 0,
            "callbacks_sent": 0,
            "callbacks_failed": 0,
            "rate_limited": 0,
            "concurrency_limited": 0,
        },
        "callbacks_pending": 0,
    }


async def test_listing_pages_newest_first_across_queues(store: Store, inspector: Inspector) -> None:
    ids = []
    for n in range(7):
        job = new_job(payload=n)
        if n % 2:
            job = Job(**{**_fields(job), "queue": "other"})
        await store.enqueue(job)
        ids.append(job.id)
    pages, cursor = [], None
    while True:
        page = await inspector.list_jobs(
            [Q, "other"], state=None, job_type=None, limit=3, cursor=cursor
        )
        pages.append([j.id for j in page.jobs])
        if page.cursor is None or not page.jobs:
            break
        cursor = page.cursor
    assert [i for p in pages for i in p] == ids[::-1]


async def test_listing_final_states_by_finish_time_through_ties(
    store: Store, inspector: Inspector
) -> None:
    await enqueue(store, 9)
    claimed = (await store.claim(Q, ME, 9, now=1, type_limits=ECHO)).jobs
    # Three finish in each of three milliseconds: pages must cross the ties exactly.
    for n, job in enumerate(claimed):
        await store.ack(Q, ME, [ended(job, "completed", "1")], now=100 + n // 3)
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page = await inspector.list_jobs(
            [Q], state="completed", job_type=None, limit=2, cursor=cursor
        )
        seen += [j.id for j in page.jobs]
        cursor = page.cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(j.id for j in claimed)
    assert len(seen) == 9
    finished = [(await stored(store, i)).finished_at for i in seen]
    assert finished == sorted(finished, reverse=True)


async def test_listing_filters_by_state_and_type(store: Store, inspector: Inspector) -> None:
    jobs = await enqueue(store, 4)
    await store.claim(Q, ME, 1, now=1, type_limits=ECHO)
    page = await inspector.list_jobs([Q], state="queued", job_type=None, limit=10, cursor=None)
    assert [j.id for j in page.jobs] == [j.id for j in jobs[1:]][::-1]
    page = await inspector.list_jobs([Q], state=None, job_type="nope", limit=10, cursor=None)
    assert page.jobs == []


def _fields(job: Job) -> dict[str, object]:
    return {name: getattr(job, name) for name in Job.__slots__}


async def test_a_new_job_stores_no_field_at_its_default_and_reads_without_id_and_queue(
    store: Store, redis: Redis
) -> None:
    plain, urgent = await enqueue(store, 1) + await enqueue(store, 1, priority=9)
    fields = await redis.hgetall(K.job(Q, plain.id))
    # attempts 0 and priority 5 are what an absent field reads as: not stored.
    assert b"attempts" not in fields
    assert b"priority" not in fields
    assert await redis.hget(K.job(Q, urgent.id), "priority") == b"9"
    # A later release stops writing id and queue: the key says them, and readers take them
    # from it already.
    await redis.hdel(K.job(Q, plain.id), "id", "queue")
    back = await stored(store, plain.id)
    assert (back.id, back.queue, back.attempts, back.priority) == (plain.id, Q, 0, 5)
    # The urgent one first; the other's first attempt counts from the absent 0.
    claimed = (await store.claim(Q, ME, 2, now=2, type_limits=ECHO)).jobs
    assert [(job.id, job.attempts) for job in claimed] == [(urgent.id, 1), (plain.id, 1)]


async def test_a_job_an_older_taskd_finished_shows_its_stored_last_entry_once(
    store: Store, redis: Redis
) -> None:
    # An older ack stored the entry of the attempt that ended the job, and kept started_at.
    job, entry = await failed_once(store)
    await redis.hset(K.job(Q, job.id), "history", orjson.dumps([entry]))
    assert (await stored(store, job.id)).history == (entry,)
    assert await store.retry(Q, job.id, now=5) == "failed"
    assert (await stored(store, job.id)).history == (entry,)
