"""Idempotent submission: a repeated submission returns the first job, even racing daemons."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anyio
from redis.asyncio import Redis

from taskd.store import Keys
from tests.support import (
    Api,
    base_url,
    get_json,
    indexed_ids,
    make_config,
    post_json,
    running_daemon,
    wait_until,
)

K = Keys("taskd")


async def submit(
    session: aiohttp.ClientSession, url: str, body: Any, key: str | None = None
) -> tuple[int, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    async with session.post(f"{url}/jobs", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_repeated_submission_returns_the_first_job(api: Api, redis: Redis) -> None:
    session, url = api
    first_status, first = await submit(session, url, {"type": "echo", "payload": 1}, key="order-42")
    again_status, again = await submit(session, url, {"type": "echo", "payload": 1}, key="order-42")
    by_field_status, by_field = await post_json(
        session, f"{url}/jobs", {"type": "echo", "payload": 1, "idempotency_key": "order-42"}
    )
    assert (first_status, again_status, by_field_status) == (201, 200, 200)
    assert again["id"] == by_field["id"] == first["id"]
    assert again["idempotency_key"] == "order-42"
    assert len(await indexed_ids(redis, "default")) == 1
    other_status, other = await submit(session, url, {"type": "echo"}, key="order-43")
    assert other_status == 201
    assert other["id"] != first["id"]


async def test_header_and_field_must_agree(api: Api) -> None:
    session, url = api
    status, body = await submit(session, url, {"type": "echo", "idempotency_key": "a"}, key="b")
    assert (status, body["error"]["code"]) == (422, "invalid_job")
    assert "differ" in body["error"]["message"]
    status, body = await post_json(session, f"{url}/jobs", {"type": "echo", "idempotency_key": ""})
    assert (status, body["error"]["code"]) == (422, "invalid_job")


async def test_racing_submissions_through_two_daemons_create_one_job(
    redis_url: str, redis: Redis
) -> None:
    config = make_config(redis_url)
    answers: list[tuple[int, Any]] = []
    async with (
        running_daemon(config) as one,
        running_daemon(config) as two,
        aiohttp.ClientSession() as session,
    ):
        urls = [base_url(one), base_url(two)]

        async def send(n: int) -> None:
            answers.append(await submit(session, urls[n % 2], {"type": "noop"}, key="retry-me"))

        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(send, n)
    assert sorted(status for status, _ in answers) == [200] * 39 + [201]
    assert len({job["id"] for _, job in answers}) == 1
    assert len(await indexed_ids(redis, "default")) == 1


async def test_racing_submissions_through_one_daemon_create_one_job(api: Api, redis: Redis) -> None:
    # Arriving together, they go in shared script calls: one key twice in one call too.
    session, url = api
    answers = await asyncio.gather(
        *(submit(session, url, {"type": "echo"}, key="once") for _ in range(40))
    )
    assert sorted(status for status, _ in answers) == [200] * 39 + [201]
    assert len({job["id"] for _, job in answers}) == 1
    assert len(await indexed_ids(redis, "default")) == 1


async def test_batches_honour_idempotency_keys(api: Api, redis: Redis) -> None:
    session, url = api
    _, first = await submit(session, url, {"type": "echo"}, key="k1")
    jobs = [
        {"type": "echo", "idempotency_key": "k1"},
        {"type": "echo", "idempotency_key": "k2"},
        {"type": "echo", "idempotency_key": "k2"},
        {"type": "echo"},
    ]
    status, body = await post_json(session, f"{url}/jobs/batch", {"jobs": jobs})
    assert status == 201
    ids = body["ids"]
    assert ids[0] == first["id"]
    assert ids[1] == ids[2]
    assert len(set(ids)) == 3
    assert len(await indexed_ids(redis, "default")) == 3


async def test_a_key_is_free_again_after_its_ttl(redis_url: str) -> None:
    config = make_config(redis_url, server={"idempotency_ttl": 0.2})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        _, first = await submit(session, url, {"type": "noop"}, key="short")

        async def new_job() -> bool:
            status, job = await submit(session, url, {"type": "noop"}, key="short")
            return status == 201 and job["id"] != first["id"]

        await wait_until(new_job, "the idempotency key to expire")


async def test_a_key_whose_job_is_gone_makes_a_new_job(api: Api, redis: Redis) -> None:
    session, url = api
    status, first = await submit(session, url, {"type": "echo", "delay": 60}, key="k")
    assert status == 201
    async with session.delete(f"{url}/jobs/{first['id']}") as response:
        assert response.status == 200
    status, again = await submit(session, url, {"type": "echo", "delay": 60}, key="k")
    assert status == 201
    assert again["id"] != first["id"]
    _, stored = await get_json(session, f"{url}/jobs/{again['id']}")
    assert stored["idempotency_key"] == "k"
    status, repeat = await submit(session, url, {"type": "echo", "delay": 60}, key="k")
    assert (status, repeat["id"]) == (200, again["id"])
