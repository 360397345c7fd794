"""When Redis misbehaves: a network that blackholes or resets, a Redis that is full. The API
answers at once with a clear 503, and work resumes by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import redis.exceptions as redis_errors
from redis.asyncio import Redis

from taskd.embedded import RedisServer
from taskd.store import Store
from tests.proxy import Proxy
from tests.support import (
    base_url,
    fill,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
    wait_until,
)

# Submissions sent at once, which the daemon's store gathers into shared script calls.
CONCURRENT = 20


async def submit(session: aiohttp.ClientSession, url: str) -> tuple[int, Any, float]:
    started = time.monotonic()
    status, body = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": 1})
    return status, body, time.monotonic() - started


async def test_a_blackholed_redis_gets_a_503_within_the_request_timeout(proxy: Proxy) -> None:
    config = make_config(proxy.url, redis={"request_timeout": 1})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        assert (await submit(session, url))[0] == 201
        proxy.blackhole()
        # Each request is bounded, the one whose script call hangs and those waiting for
        # it to answer so that theirs can go (see Store.enqueue).
        answers = await asyncio.gather(*(submit(session, url) for _ in range(CONCURRENT)))
        for status, body, took in answers:
            assert (status, body["error"]["code"]) == (503, "unavailable"), body
            assert "request_timeout" in body["error"]["message"]
            assert took < 4  # 1 s, with room for a loaded machine; it used to hang for 15
        started = time.monotonic()
        health, _ = await get_json(session, f"{url}/health")
        assert health == 503
        assert time.monotonic() - started < 5
        proxy.restore()

        async def accepted() -> bool:
            return (await submit(session, url))[0] == 201

        await wait_until(accepted, "submissions to be accepted again")
        status, job, _ = await submit(session, url)
        assert status == 201
        await wait_for_state(session, url, job["id"], {"completed"})


async def test_connections_reset_under_the_daemon_are_opened_again(proxy: Proxy) -> None:
    async with running_daemon(make_config(proxy.url)) as daemon, aiohttp.ClientSession() as s:
        url = base_url(daemon)
        jobs: list[str] = []

        async def accepted() -> bool:
            # A command on a connection that was reset fails once: a clear 503, never a 500.
            status, job, _ = await submit(s, url)
            assert status in (201, 503), job
            if status == 201:
                jobs.append(job["id"])
            return status == 201

        for _ in range(3):
            await wait_until(accepted, "a submission to be accepted")
            proxy.reset()
        await wait_until(accepted, "submissions to be accepted after the resets")
        for job_id in jobs:
            await wait_for_state(s, url, job_id, {"completed"})


async def test_a_bulk_read_cut_short_leaves_no_answers_for_the_next_command(
    proxy: Proxy, redis: Redis
) -> None:
    # The archiver reads many hashes on one connection with one deadline for all (see
    # Store._hashes). Cut short (cancelled, or by an error answer), the rest of its
    # answers are still to come on that connection: no later command may read them as
    # its own.
    keys = [f"h:{n}" for n in range(200)]
    for n, key in enumerate(keys):
        await redis.hset(key, "n", n)
    store = Store.from_url(proxy.url, prefix="taskd")
    try:
        assert await store._hashes(keys[:2]) == [{b"n": b"0"}, {b"n": b"1"}]
        proxy.blackhole()
        with anyio.move_on_after(0.5) as waited:
            await store._hashes(keys)
        assert waited.cancel_called
        proxy.restore()
        assert await store._hashes(["h:7"]) == [{b"n": b"7"}]
        # An error answer (a key that holds no hash) fails the read; the answers after it
        # are read all the same.
        await redis.set("h:1", "not a hash")
        with pytest.raises(redis_errors.ResponseError):
            await store._hashes(keys)
        assert await store._hashes(["h:7"]) == [{b"n": b"7"}]
        assert await store.connection.client.hget("h:9", "n") == b"9"
    finally:
        await store.close()


async def test_a_full_redis_answers_storage_full_and_recovers(small_redis: RedisServer) -> None:
    redis = Redis.from_url(small_redis.url)
    try:
        async with (
            running_daemon(make_config(small_redis.url)) as daemon,
            aiohttp.ClientSession() as s,
        ):
            url = base_url(daemon)
            status, running = await post_json(
                s, f"{url}/jobs", {"type": "sleep", "payload": {"seconds": 2}}
            )
            await wait_for_state(s, url, running["id"], {"active"})
            await fill(redis)
            # Submissions arriving together share a script call: its refusal is each one's,
            # every request answered with the usual error.
            answers = await asyncio.gather(*(refused(s, url) for _ in range(CONCURRENT)))
            assert answers == [(503, "5", "storage_full")] * CONCURRENT
            status, health = await get_json(s, f"{url}/health")
            assert (status, health["status"]) == (503, "storage_full")

            # A job running as Redis filled up is not lost: its outcome is recorded once
            # there is room again.
            await redis.delete(*await redis.keys("ballast:*"))
            await wait_for_state(s, url, running["id"], {"completed"})
            status, job, _ = await submit(s, url)
            assert status == 201, job
            await wait_for_state(s, url, job["id"], {"completed"})
            assert (await get_json(s, f"{url}/health"))[0] == 200
    finally:
        await redis.aclose()


async def refused(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None, str]:
    """A submission's status, Retry-After and error code."""
    async with session.post(f"{url}/jobs", json={"type": "echo"}) as response:
        body = await response.json()
        return response.status, response.headers.get("Retry-After"), body["error"]["code"]


async def test_a_redis_that_lost_its_data_is_noticed_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No AOF and no snapshots: a restart comes back empty, as a fail-over to a fresh
    # replica would.
    server = RedisServer.start_on_free_port(data_dir=tmp_path, timeout=30, appendonly=False)
    try:
        async with running_daemon(make_config(server.url)) as daemon, aiohttp.ClientSession() as s:
            url = base_url(daemon)
            status, job, _ = await submit(s, url)
            await wait_for_state(s, url, job["id"], {"completed"})
            assert "taskd_redis_data_lost_total 0.0" in await metrics(s, url)
            server.stop()
            server.start(timeout=30)

            async def counted() -> bool:
                return "taskd_redis_data_lost_total 1.0" in await metrics(s, url)

            await wait_until(counted, "the data loss to be counted")
            assert "Redis lost its data" in caplog.text
            assert (await get_json(s, f"{url}/jobs/{job['id']}"))[0] == 404  # gone indeed
            # The daemon goes on with the Redis it has: new jobs run.
            status, job, _ = await submit(s, url)
            assert status == 201
            await wait_for_state(s, url, job["id"], {"completed"})
    finally:
        server.stop()


async def metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as response:
        return await response.text()
