"""When Redis misbehaves: a network that blackholes or resets, a Redis that is full. The API
answers at once with a clear 503, and work resumes by itself."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from taskd.embedded import RedisServer
from tests.proxy import Proxy
from tests.support import (
    base_url,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
    wait_until,
)


@pytest.fixture
async def proxy(redis_url: str, redis_server: RedisServer) -> AsyncIterator[Proxy]:
    """A proxy in front of the session's (flushed) Redis."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    middle = Proxy("127.0.0.1", port)
    await middle.start()
    yield middle
    await middle.close()


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
        status, body, took = await submit(session, url)
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


async def fill(redis: Redis) -> None:
    """Write until Redis refuses: past maxmemory, with noeviction, it takes no more writes.

    A large write is refused while a little room is left (its own size counts), and a key
    that expires would give a tiny write that room back: so once the writes are refused,
    maxmemory goes a margin below what Redis holds, and stays full until ballast goes.
    """
    for n in range(2000):
        try:
            await redis.set(f"ballast:{n}", b"x" * 50_000)
        except OutOfMemoryError:
            used = int((await redis.info("memory"))["used_memory"])
            await redis.config_set("maxmemory", used - 256 * 1024)
            with pytest.raises(OutOfMemoryError):
                await redis.set("probe", b"1")
            return
    raise AssertionError("Redis took 100 MB past an 8 MB maxmemory")


async def test_a_full_redis_answers_storage_full_and_recovers(tmp_path: Path) -> None:
    server = RedisServer.start_on_free_port(
        data_dir=tmp_path,
        timeout=30,
        appendonly=False,
        extra_args=["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"],
    )
    redis = Redis.from_url(server.url)
    try:
        async with running_daemon(make_config(server.url)) as daemon, aiohttp.ClientSession() as s:
            url = base_url(daemon)
            status, running = await post_json(
                s, f"{url}/jobs", {"type": "sleep", "payload": {"seconds": 2}}
            )
            await wait_for_state(s, url, running["id"], {"active"})
            await fill(redis)
            async with s.post(f"{url}/jobs", json={"type": "echo"}) as response:
                body = await response.json()
                assert response.status == 503, body
                assert response.headers["Retry-After"] == "5"
            assert body["error"]["code"] == "storage_full"
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
        server.stop()


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
