"""The worker pool in a running daemon: limits, draining, many jobs in flight, shared work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import anyio
import pytest
from redis.asyncio import Redis

from taskd.config import Config
from taskd.daemon import Daemon, connect
from taskd.handlers import Handlers
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import POOL_SIZE, Keys, Store
from tests import handler_funcs
from tests.support import (
    REPO,
    base_url,
    make_config,
    post_json,
    ready_ids,
    running_daemon,
    wait_for_state,
    wait_until,
)

K = Keys("taskd")
TRACKED = {"tracked": {"python": "tests.handler_funcs:tracked"}}


def tracked_config(redis_url: str, concurrency: int, **workers: float) -> Config:
    return make_config(redis_url, workers={"concurrency": concurrency, **workers}, handlers=TRACKED)


async def enqueue(redis_url: str, job_type: str, payloads: list[object]) -> list[str]:
    """Put jobs straight into Redis (faster than HTTP for hundreds of jobs)."""
    store = Store.from_url(redis_url, prefix="taskd")
    try:
        ids = []
        for payload in payloads:
            job = Job(new_id(), job_type, "default", payload, QUEUED, 0, now_ms())
            await store.enqueue(job)
            ids.append(job.id)
        return ids
    finally:
        await store.close()


async def counts(redis: Redis) -> dict[str, int]:
    return {
        "ready": len(await ready_ids(redis, "default")),
        "completed": await redis.zcard(K.completed("default")),
        "failed": await redis.zcard(K.failed("default")),
    }


@pytest.fixture(autouse=True)
def fresh_tracker() -> None:
    handler_funcs.TRACKER = handler_funcs.Gauge()


async def test_never_more_jobs_running_than_the_concurrency(redis_url: str, redis: Redis) -> None:
    await enqueue(redis_url, "tracked", [0.01] * 60)
    async with running_daemon(tracked_config(redis_url, concurrency=4)):

        async def all_done() -> bool:
            return (await counts(redis))["completed"] == 60

        await wait_until(all_done, "60 jobs completed")
    assert handler_funcs.TRACKER.peak == 4


async def test_drain_lets_running_jobs_finish_within_the_deadline(
    redis_url: str, redis: Redis
) -> None:
    ids = await enqueue(redis_url, "tracked", [0.3] * 3)
    config = tracked_config(redis_url, concurrency=3, shutdown_timeout=20)
    async with running_daemon(config):
        await wait_until(running(3), "3 jobs running")
    assert await counts(redis) == {"ready": 0, "completed": 3, "failed": 0}
    for job_id in ids:
        assert await redis.hget(K.job("default", job_id), "state") == b"completed"


async def test_shutdown_returns_unfinished_jobs_to_the_queue(redis_url: str, redis: Redis) -> None:
    ids = await enqueue(redis_url, "tracked", [60] * 8)
    config = tracked_config(redis_url, concurrency=3, shutdown_timeout=0.2)
    async with running_daemon(config) as daemon:
        await wait_until(running(3), "3 jobs running")
        me = daemon.identity.id
    # Everything is back in the queue, as it was: none active, none lost, no attempt used.
    assert await counts(redis) == {"ready": 8, "completed": 0, "failed": 0}
    assert sorted(await ready_ids(redis, "default")) == sorted(i.encode() for i in ids)
    assert await redis.zcard(K.active("default", me)) == 0
    for job_id in ids:
        state, attempts = await redis.hmget(K.job("default", job_id), "state", "attempts")
        assert (state, int(attempts or 0)) == (b"queued", 0)  # absent: never claimed
    assert await redis.zcard(K.daemons) == 0  # deregistered


async def test_thousands_in_flight_on_few_connections(redis_url: str, redis: Redis) -> None:
    jobs = 3000
    await enqueue(redis_url, "tracked", [1.0] * jobs)
    async with running_daemon(tracked_config(redis_url, concurrency=jobs)):
        await wait_until(running(jobs), "all jobs running")
        clients = len(await redis.client_list())

        async def all_done() -> bool:
            return (await counts(redis))["completed"] == jobs

        await wait_until(all_done, f"{jobs} jobs completed")
    # The pool, one blocking connection for the one queue, and this test's own client.
    assert clients <= POOL_SIZE + 1 + 1


async def test_exec_handler_runs_in_the_daemon(redis_url: str) -> None:
    program = str(REPO / "tests" / "programs" / "echo_stdin.py")
    config = make_config(redis_url, handlers={"copy": {"exec": [program]}})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        _, job = await post_json(session, f"{url}/jobs", {"type": "copy", "payload": {"a": [1, 2]}})
        done = await wait_for_state(session, url, job["id"], {"completed", "failed"})
    assert done["result"] == {"a": [1, 2]}


async def test_two_daemons_share_one_queue(redis_url: str, redis: Redis) -> None:
    config = tracked_config(redis_url, concurrency=4)
    async with running_daemon(config) as first, running_daemon(config) as second:
        ids = await enqueue(redis_url, "tracked", [0.02] * 80)

        async def all_done() -> bool:
            return (await counts(redis))["completed"] == 80

        await wait_until(all_done, "80 jobs completed")
        ran_by = [await redis.hget(K.job("default", i), "daemon") for i in ids]
    assert {d.decode() for d in ran_by if d} == {first.identity.id, second.identity.id}
    assert handler_funcs.TRACKER.peak <= 8


def running(count: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for wait_until: exactly `count` tracked jobs are running."""

    async def check() -> bool:
        return handler_funcs.TRACKER.running == count

    return check


async def test_a_claimed_batch_cut_short_by_shutdown_loses_nothing(
    redis_url: str, redis: Redis
) -> None:
    ids = await enqueue(redis_url, "tracked", [60] * 300)
    config = tracked_config(redis_url, concurrency=100, shutdown_timeout=0.1)
    async with running_daemon(config):

        async def some_running() -> bool:
            return handler_funcs.TRACKER.running > 0

        # Stop while the first claimed batch of 100 is still being started.
        await wait_until(some_running, "the first jobs of the batch to start")
    assert len(await ready_ids(redis, "default")) == 300
    assert sorted(await ready_ids(redis, "default")) == sorted(i.encode() for i in ids)
    states = {await redis.hget(K.job("default", i), "state") for i in ids}
    assert states == {b"queued"}


async def test_a_handler_past_its_timeout_fails_the_attempt(redis_url: str) -> None:
    slow = {"builtin": "sleep", "timeout": 0.2, "backoff_base": 0.05, "backoff_max": 0.05}
    config = make_config(redis_url, handlers={"slow": slow})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        body = {"type": "slow", "payload": {"seconds": 30}, "max_attempts": 2}
        _, job = await post_json(session, f"{url}/jobs", body)
        done = await wait_for_state(session, url, job["id"], {"failed"})
    assert [(entry["outcome"], entry["error"]) for entry in done["history"]] == [
        ("retry", "timed out after 0.2 s"),
        ("failed", "timed out after 0.2 s"),
    ]


async def test_waiting_for_the_handler_concurrency_is_not_part_of_the_timeout(
    redis_url: str, redis: Redis
) -> None:
    # Three 0.4 s runs one at a time: the last waits ~0.8 s, and would end past the 1 s
    # timeout if the wait counted.
    one = {"builtin": "sleep", "concurrency": 1, "timeout": 1.0}
    ids = await enqueue(redis_url, "one", [{"seconds": 0.4}] * 3)
    async with running_daemon(make_config(redis_url, handlers={"one": one})):

        async def all_done() -> bool:
            return (await counts(redis))["completed"] == 3

        await wait_until(all_done, "3 jobs completed")
    for job_id in ids:
        assert await redis.hget(K.job("default", job_id), "attempts") == b"1"


async def test_jobs_do_not_outlive_a_cancelled_pool(redis_url: str) -> None:
    # Jobs run in plain asyncio tasks, not in a task group of the pool: cancelling the
    # daemon (as a crash of one of its tasks does) must still end them before it returns.
    await enqueue(redis_url, "tracked", [60] * 3)
    config = tracked_config(redis_url, concurrency=3)
    store = connect(config, config.redis.url)
    try:
        async with Handlers(config.handlers) as handlers, anyio.create_task_group() as tg:
            await tg.start(Daemon(config=config, store=store, handlers=handlers).run)
            await wait_until(running(3), "3 jobs running")
            tg.cancel_scope.cancel()
    finally:
        await store.close()
    assert handler_funcs.TRACKER.running == 0
