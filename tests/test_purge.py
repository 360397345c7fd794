"""Purging a queue and retrying dead letters in bulk: the store's batches on a real Redis, and
DELETE /queues/NAME/jobs and POST /dead/retry on in-process daemons."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import anyio
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from taskd.daemon import Daemon
from taskd.jobs import Job, now_ms
from taskd.store import Keys, Store, TypeLimits
from taskd.store.store import BATCH
from tests.builders import ended, enqueue, new_job, stored
from tests.support import (
    Api,
    get_json,
    indexed_ids,
    make_config,
    post_json,
    ready_ids,
    two_daemons,
    wait_for_state,
    wait_until,
)

Q = "default"
ME = "daemon-a"
K = Keys("taskd")
TYPES = (TypeLimits("echo"), TypeLimits("noop"))
TWO_AT_ONCE = (TypeLimits("slow", concurrency=2),)
TOKEN = "purge-secret-0123456789"


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
    return set(await indexed_ids(redis, queue))


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


# ---------------------------------------------------------------- over HTTP


async def delete(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any]:
    async with session.delete(url, headers=headers) as response:
        return response.status, await response.json()


async def counts(session: aiohttp.ClientSession, url: str, queue: str = Q) -> dict[str, int]:
    _, stats = await get_json(session, f"{url}/stats")
    return {state: stats["queues"][queue][state] for state in ("queued", "scheduled", "failed")}


async def dead_letters(session: aiohttp.ClientSession, url: str, count: int, **job: Any) -> None:
    """Submit `count` jobs that fail for good at once, and wait until they have."""
    body = {"type": "fail", "max_attempts": 1, **job}
    ids = [(await post_json(session, f"{url}/jobs", body))[1]["id"] for _ in range(count)]
    for job_id in ids:
        await wait_for_state(session, url, job_id, {"failed"})


async def test_a_purge_over_http_answers_how_many_it_removed(api: Api) -> None:
    session, url = api
    await post_json(session, f"{url}/queues/{Q}/pause", {})  # the queued jobs stay queued
    for body in [{"type": "echo"}] * 3 + [{"type": "echo", "delay": 60}] * 2:
        assert (await post_json(session, f"{url}/jobs", body))[0] == 201
    assert await counts(session, url) == {"queued": 3, "scheduled": 2, "failed": 0}

    answer = await delete(session, f"{url}/queues/{Q}/jobs?state=queued")
    assert answer == (200, {"queue": Q, "state": "queued", "removed": 3})
    assert await counts(session, url) == {"queued": 0, "scheduled": 2, "failed": 0}
    answer = await delete(session, f"{url}/queues/{Q}/jobs?state=scheduled")
    assert answer == (200, {"queue": Q, "state": "scheduled", "removed": 2})
    answer = await delete(session, f"{url}/queues/{Q}/jobs?state=failed")
    assert answer == (200, {"queue": Q, "state": "failed", "removed": 0})
    _, listed = await get_json(session, f"{url}/jobs")
    assert listed["jobs"] == []


async def test_a_purge_of_dead_letters_over_http(api: Api) -> None:
    session, url = api
    await dead_letters(session, url, 3)
    answer = await delete(session, f"{url}/queues/{Q}/jobs?state=failed")
    assert answer == (200, {"queue": Q, "state": "failed", "removed": 3})
    assert await get_json(session, f"{url}/dead") == (200, {"jobs": [], "next_cursor": None})


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        (f"/queues/{Q}/jobs", 400, "give 'state': one of queued, scheduled, failed"),
        (f"/queues/{Q}/jobs?state=", 400, "give 'state'"),
        (f"/queues/{Q}/jobs?state=active", 400, "'state' must be one of queued"),
        (f"/queues/{Q}/jobs?state=completed", 400, "never running ones"),
        (f"/queues/{Q}/jobs?state=queued&all=1", 400, "unknown parameter(s) all"),
        ("/queues/nowhere/jobs?state=queued", 404, "no queue 'nowhere'"),
        ("/queues/a:b/jobs?state=queued", 404, "'a:b' is not a queue name"),
    ],
)
async def test_a_bad_purge_is_refused_and_removes_nothing(
    api: Api, path: str, status: int, message: str
) -> None:
    session, url = api
    await post_json(session, f"{url}/jobs", {"type": "echo", "delay": 60})
    code, body = await delete(session, f"{url}{path}")
    assert (code, body["error"]["code"]) == (
        status,
        "not_found" if status == 404 else "invalid_query",
    )
    assert message in body["error"]["message"]
    assert (await counts(session, url))["scheduled"] == 1


@pytest.mark.daemon_config(
    handlers={
        "fail": {"builtin": "fail"},
        "flaky": {"builtin": "fail"},
        "echo": {"builtin": "echo"},
    }
)
async def test_a_bulk_retry_over_http_puts_dead_letters_back_by_type_and_queue(api: Api) -> None:
    session, url = api
    await dead_letters(session, url, 3)
    await dead_letters(session, url, 2, type="flaky")
    await post_json(session, f"{url}/queues/{Q}/pause", {})  # the retried jobs stay queued

    status, answer = await post_json(session, f"{url}/dead/retry?type=fail", None)
    assert (status, answer) == (200, {"retried": 3, "queue": None, "type": "fail"})
    _, dead = await get_json(session, f"{url}/dead")
    assert {job["type"] for job in dead["jobs"]} == {"flaky"}
    _, queued = await get_json(session, f"{url}/jobs?state=queued")
    assert [(job["type"], job["attempts"]) for job in queued["jobs"]] == [("fail", 0)] * 3
    assert {job["history"][0]["outcome"] for job in queued["jobs"]} == {"failed"}

    status, answer = await post_json(session, f"{url}/dead/retry", {"queue": Q})
    assert (status, answer) == (200, {"retried": 2, "queue": Q, "type": None})
    assert await post_json(session, f"{url}/dead/retry", {}) == (
        200,
        {"retried": 0, "queue": None, "type": None},
    )
    assert (await counts(session, url))["queued"] == 5


@pytest.mark.parametrize(
    ("query", "body", "status", "code", "message"),
    [
        ("?queue=nowhere", None, 404, "not_found", "no queue 'nowhere'"),
        ("", {"queue": "nowhere"}, 404, "not_found", "no queue 'nowhere'"),
        ("?queue=no{braces}", None, 400, "invalid_query", "'queue' is not a queue's name"),
        ("?type=a%20b", None, 400, "invalid_query", "'type' is not a job type's name"),
        ("?state=failed", None, 400, "invalid_query", "unknown parameter(s) state"),
        ("", {"types": "fail"}, 400, "invalid_query", "unknown parameter(s) types"),
        ("", {"type": 5}, 400, "invalid_query", "'type' must be a string, got number"),
        ("", ["fail"], 400, "invalid_query", "must be a JSON object or empty, got array"),
        ("?type=fail", {"type": "echo"}, 400, "invalid_query", "'fail' in the query but 'echo'"),
        ("", b"{nope", 400, "invalid_json", "not valid JSON"),
        ("", b"type=fail", 415, "unsupported_media_type", "send the body as JSON"),
    ],
)
async def test_a_bad_bulk_retry_is_refused_and_retries_nothing(
    api: Api, query: str, body: Any, status: int, code: str, message: str
) -> None:
    session, url = api
    await dead_letters(session, url, 1)
    if isinstance(body, bytes):
        kind = "text/plain" if status == 415 else "application/json"
        request = session.post(
            f"{url}/dead/retry{query}", data=body, headers={"Content-Type": kind}
        )
    else:
        request = session.post(f"{url}/dead/retry{query}", json=body)
    async with request as response:
        answer = await response.json()
        assert (response.status, answer["error"]["code"]) == (status, code), answer
    assert message in answer["error"]["message"]
    assert (await counts(session, url))["failed"] == 1


@pytest.mark.daemon_config(server={"token": TOKEN})
@pytest.mark.parametrize(
    ("method", "path"), [("DELETE", f"/queues/{Q}/jobs?state=queued"), ("POST", "/dead/retry")]
)
async def test_purge_and_bulk_retry_need_the_token_and_refuse_other_sites(
    api: Api, method: str, path: str
) -> None:
    session, url = api
    token = {"Authorization": f"Bearer {TOKEN}"}
    async with session.request(method, f"{url}{path}") as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
    foreign = {**token, "Origin": "https://evil.example"}
    async with session.request(method, f"{url}{path}", headers=foreign) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "forbidden_origin"
    async with session.request(method, f"{url}{path}", headers=token) as response:
        assert response.status == 200


# ---------------------------------------------------------------- a large purge under load

LARGE = 200_000
# A job type of the purged queue: each daemon runs 4 at once, for longer than the test.
SLOW = {"builtin": "sleep", "concurrency": 4}
# What Redis's slow log records: commands that took longer than this (µs). One script
# purging 200,000 jobs takes seconds; a batch takes milliseconds, even on a loaded machine.
SLOW_COMMAND_US = 250_000


class PingProbe:
    """PINGs Redis from a thread and a connection of its own, apart from the daemons and
    the test on the event loop, noting how long each answer took (seconds)."""

    def __init__(self, url: str) -> None:
        self.waits: list[float] = []
        self._client = SyncRedis.from_url(url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PingProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            started = time.perf_counter()
            self._client.ping()
            self.waits.append(time.perf_counter() - started)


async def active_ids(redis: Redis, daemons: Sequence[Daemon]) -> set[str]:
    found: set[str] = set()
    for daemon in daemons:
        found |= {i.decode() for i in await redis.zrange(K.active(Q, daemon.identity.id), 0, -1)}
    return found


@pytest.mark.timeout(240)
async def test_a_purge_of_200000_jobs_while_daemons_run_is_exact_and_never_holds_redis(
    redis_url: str, store: Store, redis: Redis
) -> None:
    # Straight into Redis: 200,000 slow jobs, 100 delayed ones of the same queue, and
    # 10,000 of a queue no daemon serves.
    nap = {"seconds": 600}
    await store.enqueue_many([new_job("slow", nap, priority=n % 10) for n in range(LARGE)])
    delayed = await enqueue(store, 100, run_at=now_ms() + 3_600_000)
    await store.enqueue_many([new_job(queue="elsewhere") for _ in range(10_000)])
    config = make_config(
        redis_url,
        workers={"queues": [Q, "other"]},
        handlers={"slow": SLOW, "echo": {"builtin": "echo", "queue": "other"}},
    )
    async with two_daemons(config) as (session, daemons, urls):
        # Each daemon starts 4 slow jobs and runs them through the test.
        async def all_started() -> bool:
            return len(await active_ids(redis, daemons)) == 8

        await wait_until(all_started, "each daemon to start 4 slow jobs", deadline=60)
        running = await active_ids(redis, daemons)
        # Meanwhile the daemons go on with the jobs of another queue.
        sent: list[str] = []
        other = asyncio.create_task(submit_until_cancelled(session, urls[1], sent))
        slowlog = await redis.config_get("slowlog-log-slower-than")
        await redis.config_set("slowlog-log-slower-than", SLOW_COMMAND_US)
        await redis.slowlog_reset()
        try:
            with PingProbe(redis_url) as probe:
                status, answer = await delete(session, f"{urls[0]}/queues/{Q}/jobs?state=queued")
            slow_commands = await redis.slowlog_get(128)
        finally:
            await redis.config_set("slowlog-log-slower-than", slowlog["slowlog-log-slower-than"])
            other.cancel()

        assert (status, answer) == (200, {"queue": Q, "state": "queued", "removed": LARGE - 8})
        # Redis served everyone between the batches: no command of anyone took long, and
        # a client apart got its answers throughout (a generous bound: a loaded machine).
        assert slow_commands == []
        assert len(probe.waits) > 10
        assert max(probe.waits) < 2.0
        assert await active_ids(redis, daemons) == running
        for job_id in running:
            assert (await stored(store, job_id)).state == "active"
        assert await counts(session, urls[0]) == {"queued": 0, "scheduled": 100, "failed": 0}
        assert await index_ids(redis) == running | {job.id for job in delayed}
        assert await ready_ids(redis, Q) == []
        assert len(await ready_ids(redis, "elsewhere")) == 10_000
        assert len(await indexed_ids(redis, "elsewhere")) == 10_000
        assert sent
        for job_id in sent:
            await wait_for_state(session, urls[1], job_id, {"completed"})


async def submit_until_cancelled(session: aiohttp.ClientSession, url: str, ids: list[str]) -> None:
    """Submit echo jobs (of the queue "other") one after another, noting their ids."""
    while True:
        status, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": 1})
        assert status == 201, job
        ids.append(job["id"])
        await anyio.sleep(0.02)
