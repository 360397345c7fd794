"""Callbacks: a finished job's final record is POSTed to its callback_url, with retries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from taskd.keys import Keys
from tests.support import base_url, make_config, post_json, running_daemon, wait_until

K = Keys("taskd")


@dataclass
class Receiver:
    """A real HTTP endpoint that records callbacks and fails the first `failures` of them."""

    url: str = ""
    failures: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.refused < self.failures:
            self.refused += 1
            return web.Response(status=503)
        self.received.append(await request.json())
        return web.Response(status=204)


@pytest.fixture
async def receiver(free_port: Any) -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    recv.url = f"http://127.0.0.1:{port}/hook"
    yield recv
    await runner.cleanup()


async def submit(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        status, job = await post_json(session, f"{url}/jobs", body)
    assert status == 201, job
    return job


async def test_final_states_are_called_back(redis_url: str, receiver: Receiver) -> None:
    async with running_daemon(make_config(redis_url)) as daemon:
        url = base_url(daemon)
        done = await submit(url, {"type": "echo", "payload": 1, "callback_url": receiver.url})
        dead = await submit(url, {"type": "fail", "max_attempts": 1, "callback_url": receiver.url})
        waiting = await submit(url, {"type": "echo", "delay": 60, "callback_url": receiver.url})
        async with aiohttp.ClientSession() as session:
            await post_json(session, f"{url}/jobs/{waiting['id']}/cancel", {})

        async def three() -> bool:
            return len(receiver.received) == 3

        await wait_until(three, "three callbacks")
    by_id = {record["id"]: record for record in receiver.received}
    assert by_id[done["id"]]["state"] == "completed"
    assert by_id[done["id"]]["result"] == 1
    assert by_id[dead["id"]]["state"] == "failed"
    assert by_id[waiting["id"]]["state"] == "cancelled"


async def test_a_failing_callback_is_retried(redis_url: str, receiver: Receiver) -> None:
    receiver.failures = 2
    async with running_daemon(make_config(redis_url)) as daemon:
        job = await submit(base_url(daemon), {"type": "noop", "callback_url": receiver.url})

        async def delivered() -> bool:
            return len(receiver.received) == 1

        await wait_until(delivered, "the callback after two refusals")
    assert receiver.received[0]["id"] == job["id"]
    assert receiver.refused == 2


async def test_a_callback_that_keeps_failing_is_counted_and_changes_nothing(
    redis_url: str, receiver: Receiver, redis: Redis
) -> None:
    receiver.failures = 100
    async with running_daemon(make_config(redis_url)) as daemon:
        job = await submit(base_url(daemon), {"type": "echo", "callback_url": receiver.url})

        async def counted() -> bool:
            return await redis.hget(K.totals("default"), "callbacks_failed") == b"1"

        await wait_until(counted, "the failed callback to be counted")
    assert await redis.hget(K.job("default", job["id"]), "state") == b"completed"
    assert receiver.received == []


async def test_bad_callback_urls_are_refused(redis_url: str) -> None:
    async with running_daemon(make_config(redis_url)) as daemon, aiohttp.ClientSession() as s:
        for bad in ("ftp://x/y", "not a url", 7):
            status, body = await post_json(
                s, f"{base_url(daemon)}/jobs", {"type": "echo", "callback_url": bad}
            )
            assert (status, body["error"]["code"]) == (422, "invalid_job")
