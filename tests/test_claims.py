"""Claims take only what their daemon can start now: its types, its free slots per type, and
held jobs in priority order (claim.lua through the store, on a real Redis)."""

from __future__ import annotations

from redis.asyncio import Redis

from taskd.jobs import Job
from taskd.stats import no_handler
from taskd.store import DaemonInfo, Inspector, Keys, Store, TypeLimits, Unhandled
from tests.builders import done, new_job
from tests.support import ECHO

Q = "default"
K = Keys("taskd")
RESIZE = TypeLimits("resize")
SLOW = TypeLimits("slow")
ONE_AT_A_TIME = TypeLimits("slow", concurrency=1)


def daemon(daemon_id: str, types: tuple[str, ...], queues: tuple[str, ...] = (Q,)) -> DaemonInfo:
    return DaemonInfo(daemon_id, "host", 1, 0, 10, queues, 0, 1, types)


async def taken_order(redis: Redis) -> list[str]:
    """The ready ids of one priority in the order claims take them: the inbox's, then the
    priority's list (lists are consumed from the right)."""
    lists = [K.inbox(Q), *(K.priority_list(Q, p) for p in reversed(range(10)))]
    return [i.decode() for key in lists for i in reversed(await redis.lrange(key, 0, -1))]


async def test_a_claim_leaves_jobs_of_types_it_has_no_handler_for_in_place(
    store: Store, inspector: Inspector, redis: Redis
) -> None:
    jobs = [new_job("resize" if n % 2 else "echo", {"n": n}) for n in range(10)]
    await store.enqueue_many(jobs)
    claim = await store.claim(Q, "old", 10, now=2, type_limits=ECHO)
    assert [j.payload["n"] for j in claim.jobs] == [0, 2, 4, 6, 8]
    assert (claim.skipped, claim.more) == (5, False)
    resize = [j.id for j in jobs if j.type == "resize"]
    assert await taken_order(redis) == resize
    assert {(await store.get_job(i, [Q])).state for i in resize} == {"queued"}  # type: ignore[union-attr]
    # The first one passed is noted, for /stats, until a daemon that knows the type starts one.
    assert await inspector.unhandled([Q]) == {Q: [Unhandled("resize", resize[0], 1)]}
    claim = await store.claim(Q, "new", 10, now=3, type_limits=[*ECHO, RESIZE])
    assert [j.id for j in claim.jobs] == resize
    assert [j.attempts for j in claim.jobs] == [1] * 5  # skipping used no attempt
    assert await inspector.unhandled([Q]) == {Q: []}  # the job noted is no longer queued


async def test_a_claim_takes_no_more_of_a_type_than_its_free_slots_here(
    store: Store, inspector: Inspector, redis: Redis
) -> None:
    jobs = [new_job("slow", {"n": n}) for n in range(3)] + [
        new_job("echo", {"n": n}) for n in range(3, 5)
    ]
    await store.enqueue_many(jobs)
    limits = [SLOW, *ECHO]
    claim = await store.claim(Q, "a", 10, now=2, type_limits=limits, free={"slow": 1})
    assert [j.payload["n"] for j in claim.jobs] == [0, 3, 4]  # the echo jobs behind go on
    assert claim.skipped == 2
    assert await taken_order(redis) == [jobs[1].id, jobs[2].id]
    # Another daemon with a free slot takes the next, in order; one without takes none.
    assert (await store.claim(Q, "b", 10, now=3, type_limits=limits, free={"slow": 0})).jobs == []
    [second] = (await store.claim(Q, "c", 10, now=3, type_limits=limits, free={"slow": 1})).jobs
    assert second.id == jobs[1].id
    assert await inspector.unhandled([Q]) == {Q: []}  # busy is not unhandled


async def test_skipped_jobs_never_make_a_claim_say_more(store: Store, redis: Redis) -> None:
    jobs = [new_job("resize", {"n": n}) for n in range(2500)]
    behind = new_job("echo", {"n": 2500})
    await store.enqueue_many([*jobs, behind])
    claim = await store.claim(Q, "old", 5, now=2, type_limits=ECHO)
    # Its budget (5 + 1,000 ids) went on jobs it cannot start: claiming again at once
    # would only find them again, so it does not ask to, and the job behind them waits.
    assert (claim.jobs, claim.more, claim.skipped) == ([], False, 1005)
    assert await taken_order(redis) == [j.id for j in jobs] + [behind.id]
    taken: list[str] = []
    while claimed := (await store.claim(Q, "new", 700, now=3, type_limits=[*ECHO, RESIZE])).jobs:
        taken += [j.id for j in claimed]
    assert taken == [j.id for j in jobs] + [behind.id]


async def test_held_jobs_start_highest_priority_first_then_oldest(store: Store) -> None:
    await store.enqueue(new_job("slow", {"n": -1}))
    [blocker] = (await store.claim(Q, "a", 10, now=2, type_limits=[ONE_AT_A_TIME])).jobs
    priorities = [1, 9, 5, 3, 7, 2, 8, 5, 9, 1]
    held = [
        new_job("slow", {"n": n}, priority=p, created_at=10 + n) for n, p in enumerate(priorities)
    ]
    for n, each in enumerate(held):
        await store.enqueue(each)
        # Claimed (and held) by two daemons in turn, as they arrive.
        claim = await store.claim(Q, "ab"[n % 2], 10, now=20 + n, type_limits=[ONE_AT_A_TIME])
        assert (claim.jobs, claim.held) == ([], 1)
    started: list[Job] = []
    running = blocker
    for n in range(len(held)):
        await store.ack(Q, running.daemon or "", [done(running)], now=40 + n)
        [running] = (
            await store.claim(Q, "ab"[n % 2], 10, now=40 + n, type_limits=[ONE_AT_A_TIME])
        ).jobs
        started.append(running)
    expected = sorted(held, key=lambda j: (-j.priority, j.created_at))
    assert [j.id for j in started] == [j.id for j in expected]
    assert [j.waited_ms for j in started[:2]] == [40 - 11, 41 - 18]  # from when each was due


async def test_a_freed_slot_wakes_a_daemon_blocked_on_the_queue(store: Store) -> None:
    await store.enqueue_many([new_job("slow", {"n": 0}), new_job("slow", {"n": 1})])
    [first] = (await store.claim(Q, "a", 10, now=2, type_limits=[ONE_AT_A_TIME])).jobs
    assert not await store.wait_for_job(Q, "b", 1)  # nothing ready: the other is held
    await store.ack(Q, "a", [done(first)], now=3)
    assert await store.wait_for_job(Q, "b", 1)  # woken at once by the freed slot
    [second] = (await store.claim(Q, "b", 10, now=4, type_limits=[ONE_AT_A_TIME])).jobs
    assert second.payload == {"n": 1}


async def test_jobs_an_older_daemon_held_in_a_list_join_the_line(
    store: Store, redis: Redis
) -> None:
    old = [new_job("slow", {"n": n}, priority=p) for n, p in enumerate([2, 8, 5])]
    await store.enqueue_many(old)
    for each in old:  # as a daemon of the previous release held them
        assert await store.get_job(each.id, [Q])  # the record exists
        for list_key in K.ready_lists(Q):
            await redis.lrem(list_key, 0, each.id)
        await redis.hset(K.job(Q, each.id), "waiting_for", "concurrency")
        await redis.lpush(K.limit(Q, "slow", "held"), each.id)
    [first] = (await store.claim(Q, "a", 10, now=2, type_limits=[ONE_AT_A_TIME])).jobs
    assert first.id == old[1].id  # the best of them, not the longest held
    assert await redis.exists(K.limit(Q, "slow", "held")) == 0
    assert await redis.zcard(K.limit(Q, "slow", "line")) == 2


async def test_returned_jobs_wait_from_their_return(store: Store) -> None:
    await store.enqueue_many([new_job("echo", {"n": 0}), new_job("echo", {"n": 1})])
    await store.claim(Q, "a", 1, now=2, type_limits=ECHO)
    await store.claim(Q, "dead", 1, now=2, type_limits=ECHO)
    assert await store.requeue_inflight(Q, "a", now=100) == 1
    assert await store.recover(Q, "dead", now=200, before=50) == 1
    claimed = (await store.claim(Q, "b", 2, now=300, type_limits=ECHO)).jobs
    assert sorted(j.waited_ms for j in claimed) == [100, 200]  # not 299 since creation


async def test_in_flight_counts_each_daemons_active_sets_now(
    store: Store, inspector: Inspector
) -> None:
    await store.enqueue_many([new_job("echo", {"n": n}) for n in range(5)])
    await store.claim(Q, "a", 3, now=2, type_limits=ECHO)
    assert await inspector.in_flight([daemon("a", ("echo",)), daemon("b", ("echo",))]) == {
        "a": 3,
        "b": 0,
    }


def test_no_handler_names_types_no_live_daemon_of_the_queue_can_run() -> None:
    noted = {Q: [Unhandled("resize", "j1", 1000), Unhandled("echo", "j2", 1500)], "other": []}
    fleet = [daemon("a", ("echo",)), daemon("b", ("resize",), queues=("other",))]
    assert no_handler(noted, fleet, now=4000) == {
        Q: {"resize": {"job": "j1", "wait_ms": 3000}},
        "other": {},
    }
    fleet.append(daemon("c", ("resize",)))
    assert no_handler(noted, fleet, now=4000) == {Q: {}, "other": {}}
