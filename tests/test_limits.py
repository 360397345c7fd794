"""Limits across daemons: a job type's global_concurrency and rate_limit, enforced in Redis."""

from __future__ import annotations

from datetime import datetime

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from taskd.store import Inspector, Keys, Store, TypeLimits
from tests import handler_funcs
from tests.builders import done, new_job, stored
from tests.support import (
    get_json,
    make_config,
    post_json,
    ready_ids,
    submit_in_turn,
    two_daemons,
    wait_for_state,
    wait_until,
)

Q = "default"
K = Keys("taskd")
TWO_AT_ONCE = [TypeLimits("slow", concurrency=2)]
THREE_A_SECOND = [TypeLimits("slow", rate_count=3, rate_per_ms=1000)]


async def test_global_concurrency_holds_jobs_over_it_without_an_attempt(
    store: Store, inspector: Inspector
) -> None:
    jobs = [new_job("slow", {"n": n}) for n in range(5)] + [new_job("fast", {"n": 0})]
    await store.enqueue_many(jobs)
    limits = [*TWO_AT_ONCE, TypeLimits("fast")]
    claimed = (await store.claim(Q, "a", 10, now=2, type_limits=limits)).jobs
    assert [j.id for j in claimed] == [jobs[0].id, jobs[1].id, jobs[5].id]
    held = await stored(store, jobs[2].id)
    assert (held.state, held.attempts, held.waiting_for) == ("queued", 0, "concurrency")
    # Another daemon gets none of them either: the limit is in Redis, not in a daemon.
    assert (await store.claim(Q, "b", 10, now=3, type_limits=TWO_AT_ONCE)).jobs == []
    # A finished job frees its slot, and the best held job starts next.
    assert await store.ack(Q, "a", [done(claimed[0])], now=4) == [True]
    [next_job] = (await store.claim(Q, "b", 10, now=5, type_limits=TWO_AT_ONCE)).jobs
    assert next_job.id == jobs[2].id
    assert next_job.attempts == 1
    assert (await stored(store, jobs[2].id)).waiting_for is None
    counts = await inspector.limit_status(Q, TWO_AT_ONCE, now=5)
    assert counts["slow"] == {
        "running": 2,
        "held": 2,
        "started_in_window": 0,
        "rate_limited": 0,
        "concurrency_limited": 3,
    }


async def test_slots_come_back_when_a_daemon_dies_or_stops(store: Store, redis: Redis) -> None:
    jobs = [new_job("slow", {"n": n}) for n in range(4)]
    await store.enqueue_many(jobs)
    await store.claim(Q, "dead", 10, now=2, type_limits=TWO_AT_ONCE)
    # The reaper takes the dead daemon's jobs back, and with them their slots.
    assert await store.recover(Q, "dead", now=100, before=50) == 2
    assert await redis.zcard(K.limit(Q, "slow", "running")) == 0
    claimed = (await store.claim(Q, "live", 10, now=101, type_limits=TWO_AT_ONCE)).jobs
    assert len(claimed) == 2
    assert await store.requeue_inflight(Q, "live", now=102) == 2
    assert await redis.zcard(K.limit(Q, "slow", "running")) == 0
    assert len((await store.claim(Q, "live", 10, now=103, type_limits=TWO_AT_ONCE)).jobs) == 2


async def test_a_held_job_can_be_cancelled(store: Store, redis: Redis) -> None:
    jobs = [new_job("slow", {"n": n}) for n in range(3)]
    await store.enqueue_many(jobs)
    await store.claim(Q, "a", 10, now=2, type_limits=TWO_AT_ONCE)
    assert await store.cancel(Q, jobs[2].id, now=3) == "queued"
    assert await redis.zcard(K.limit(Q, "slow", "line")) == 0
    assert (await stored(store, jobs[2].id)).state == "cancelled"


async def test_rate_limit_schedules_jobs_over_it_at_the_rate(
    store: Store, inspector: Inspector
) -> None:
    jobs = [new_job("slow", {"n": n}) for n in range(6)]
    await store.enqueue_many(jobs)
    claim = await store.claim(Q, "a", 10, now=1000, type_limits=THREE_A_SECOND)
    assert [j.id for j in claim.jobs] == [j.id for j in jobs[:3]]
    assert claim.due == 2000
    waiting = [await stored(store, j.id) for j in jobs[3:]]
    assert [(j.state, j.attempts, j.waiting_for) for j in waiting] == [
        ("scheduled", 0, "rate_limit")
    ] * 3
    assert [j.run_at for j in waiting] == [2000, 2333, 2666]
    assert (await inspector.limit_status(Q, THREE_A_SECOND, now=1500))["slow"]["rate_limited"] == 3
    # Another daemon at the same time gets none: the window is shared.
    assert (await store.claim(Q, "b", 10, now=1999, type_limits=THREE_A_SECOND)).jobs == []
    assert await store.promote(Q, now=2000) == (1, 2333)
    [fourth] = (await store.claim(Q, "b", 10, now=2000, type_limits=THREE_A_SECOND)).jobs
    assert fourth.id == jobs[3].id
    assert fourth.attempts == 1


async def test_a_rate_counts_a_start_when_its_started_at_says(store: Store) -> None:
    # A claim's time is read before it waits for a connection, so a job can be newer than
    # it; such a job's started_at is its creation. The window counts that time too, or
    # a second of started_at values could hold more starts than the rate.
    first = [new_job("slow", {"n": n}, created_at=1050) for n in range(3)]
    await store.enqueue_many(first)
    claimed = (await store.claim(Q, "a", 10, now=1000, type_limits=THREE_A_SECOND)).jobs
    assert [j.started_at for j in claimed] == [1050] * 3
    await store.enqueue_many([new_job("slow", {"n": 3}, created_at=1500)])
    assert (await store.claim(Q, "b", 10, now=2040, type_limits=THREE_A_SECOND)).jobs == []
    assert await store.promote(Q, now=2050) == (1, None)
    [late] = (await store.claim(Q, "b", 10, now=2050, type_limits=THREE_A_SECOND)).jobs
    assert late.started_at == 2050


async def test_a_late_claim_with_an_older_time_does_not_start_within_the_window(
    store: Store,
) -> None:
    # Two daemons' claims can reach Redis out of the order of their times (each read its
    # time before it waited for a connection). The fresher one drops starts that left ITS
    # window; the older time must not then count a window those starts were still in.
    await store.enqueue_many([new_job("slow", {"n": n}) for n in range(3)])
    first = (await store.claim(Q, "a", 10, now=1000, type_limits=THREE_A_SECOND)).jobs
    assert [j.started_at for j in first] == [1000] * 3
    await store.enqueue_many([new_job("slow", {"n": n}, created_at=1500) for n in range(2)])
    [fresh] = (await store.claim(Q, "a", 1, now=2000, type_limits=THREE_A_SECOND)).jobs
    assert fresh.started_at == 2000
    [late] = (await store.claim(Q, "b", 1, now=1990, type_limits=THREE_A_SECOND)).jobs
    starts = sorted(j.started_at for j in [*first, fresh, late])
    assert all(b - a >= 1000 for a, b in zip(starts, starts[3:], strict=False)), starts
    assert late.started_at == 2000


async def test_the_starts_outlive_their_window_by_as_late_as_a_claim_can_come(
    store: Store, redis: Redis
) -> None:
    # Redis expires the key by its own clock; a claim made (NOW read) up to the request
    # timeout earlier must still find the starts of its window there.
    await store.enqueue_many([new_job("slow", {"n": n}) for n in range(3)])
    assert len((await store.claim(Q, "a", 10, now=1000, type_limits=THREE_A_SECOND)).jobs) == 3
    assert await redis.pttl(K.limit(Q, "slow", "starts")) > 1000 + 59_000


async def test_a_claim_stops_at_its_budget_and_says_there_is_more(
    store: Store, redis: Redis
) -> None:
    await store.enqueue_many([new_job("slow", {"n": n}) for n in range(2500)])
    claim = await store.claim(Q, "a", 5, now=2, type_limits=TWO_AT_ONCE)
    assert len(claim.jobs) == 2
    assert claim.more
    while claim.more:
        claim = await store.claim(Q, "a", 5, now=2, type_limits=TWO_AT_ONCE)
        assert claim.jobs == []
    assert await ready_ids(redis, Q) == []
    assert await redis.zcard(K.limit(Q, "slow", "line")) == 2498


async def test_held_jobs_go_when_their_limit_is_removed(store: Store) -> None:
    jobs = [new_job("slow", {"n": n}) for n in range(6)]
    await store.enqueue_many(jobs)
    assert len((await store.claim(Q, "a", 10, now=2, type_limits=TWO_AT_ONCE)).jobs) == 2
    removed = [TypeLimits("slow")]
    # The janitor of a daemon without the limit frees them (claims do not look).
    assert await store.free_held(Q, ["slow"]) == 4
    claimed = (await store.claim(Q, "a", 10, now=4, type_limits=removed)).jobs
    assert [j.id for j in claimed] == [j.id for j in jobs[2:]]


async def test_held_jobs_go_when_none_of_their_type_runs(
    store: Store, inspector: Inspector, redis: Redis
) -> None:
    jobs = [new_job("slow", {"n": n}) for n in range(6)]
    await store.enqueue_many(jobs)
    await store.claim(Q, "a", 10, now=2, type_limits=TWO_AT_ONCE)
    await redis.delete(K.limit(Q, "slow", "running"))  # as if the releases were missed
    claimed = (await store.claim(Q, "a", 10, now=4, type_limits=TWO_AT_ONCE)).jobs
    assert [j.id for j in claimed] == [j.id for j in jobs[2:4]]
    # Only as many as may run are freed: the others stay held, not churned.
    assert await redis.zcard(K.limit(Q, "slow", "line")) == 2
    assert (await inspector.limit_status(Q, TWO_AT_ONCE, now=4))["slow"]["concurrency_limited"] == 4


async def test_two_daemons_run_at_most_global_concurrency_jobs_of_a_type(
    redis_url: str,
) -> None:
    gauge = handler_funcs.reset_gauge()
    # At most 2 at once in each daemon, so that 3 at once takes both: the limit is held
    # across them, not within one (a daemon that frees a slot of the type claims the next
    # job with that ack, so one daemon alone would otherwise keep the work).
    gated = {"python": "tests.handler_funcs:gated", "global_concurrency": 3, "concurrency": 2}
    config = make_config(redis_url, handlers={"gated": gated})
    async with two_daemons(config) as (session, (one, two), urls):
        ids = await submit_in_turn(session, urls, {"type": "gated"}, 12)
        free = await post_json(session, f"{urls[0]}/jobs", {"type": "noop"})

        async def all_waiting() -> bool:
            _, stats = await get_json(session, f"{urls[1]}/stats")
            limits = stats["queues"]["default"]["limits"]["gated"]
            return limits["running"] == 3 and limits["held"] == 9

        await wait_until(all_waiting, "3 gated jobs running and 9 held")
        assert gauge.running == 3
        # Other types are not held up by a limited one.
        await wait_for_state(session, urls[0], free[1]["id"], {"completed"})
        gauge.gate.set()
        jobs = [await wait_for_state(session, urls[1], i, {"completed"}) for i in ids]
    assert gauge.peak == 3
    assert all(job["attempts"] == 1 for job in jobs)
    assert {job["daemon"] for job in jobs} == {one.identity.id, two.identity.id}


async def test_two_daemons_share_one_rate_limit(redis_url: str) -> None:
    handlers = {"limited": {"builtin": "echo", "rate_limit": "4/s"}}
    config = make_config(redis_url, handlers=handlers)
    async with two_daemons(config) as (session, _, urls):
        ids = await submit_in_turn(session, urls, {"type": "limited"}, 10)
        jobs = [
            await wait_for_state(session, urls[n % 2], i, {"completed"}) for n, i in enumerate(ids)
        ]
        _, stats = await get_json(session, f"{urls[0]}/stats")
        waits = [await limit_waits(session, url) for url in urls]
    starts = sorted(parse_ms(job["started_at"]) for job in jobs)
    # At most 4 starts in any second, across both daemons: 10 jobs take over 2 s.
    for n in range(len(starts) - 4):
        assert starts[n + 4] - starts[n] >= 1000, starts
    assert all(job["attempts"] == 1 for job in jobs)
    limits = stats["queues"]["default"]["limits"]["limited"]
    assert limits["rate_limit"] == "4/s"
    assert limits["rate_limited"] >= 6
    assert stats["queues"]["default"]["totals"]["rate_limited"] == limits["rate_limited"]
    # Each daemon's /metrics counts the waits its own claims made.
    assert sum(waits) == limits["rate_limited"]


async def limit_waits(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "taskd_job_limit_waits_total" and sample.labels["limit"] == "rate_limit"
    )


def parse_ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)
