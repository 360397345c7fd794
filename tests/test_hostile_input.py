"""Hostile input and hostile browsers: refused whole before anything is written, with the
JSON error document; a web page in the operator's browser cannot submit jobs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from redis.asyncio import Redis

from taskd.store import Keys
from tests.support import (
    Api,
    base_url,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
)

K = Keys("taskd")
JSON = {"Content-Type": "application/json"}


async def post_raw(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


async def test_a_batch_with_one_bad_job_writes_nothing_at_all(api: Api, redis: Redis) -> None:
    session, url = api
    jobs = [{"type": "echo", "payload": n} for n in range(999)]
    # 300 levels: orjson parses it, but could not write it back out (254 at most).
    body = orjson.dumps({"jobs": jobs})[:-2] + b',{"type":"echo","payload":'
    body += b"[" * 300 + b"]" * 300 + b"}]}"
    status, answer = await post_raw(session, f"{url}/jobs/batch", body, JSON)
    assert status == 422
    assert answer["error"]["code"] == "invalid_job"
    assert answer["error"]["message"].startswith("jobs[999]: 'payload' nests deeper than 64")
    assert await redis.keys("taskd:*:job:*") == []
    assert await redis.hget(K.totals("default"), "enqueued") is None


async def test_payloads_at_the_limits_are_kept_exactly(api: Api) -> None:
    session, url = api
    payload = {"deep": nested(63), "big": 2**64 - 1, "small": -(2**63), "digits": "1" * 40}
    status, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": payload})
    assert status == 201, job
    done = await wait_for_state(session, url, job["id"], {"completed"})
    assert done["result"] == payload


async def test_a_key_given_twice_keeps_its_last_value(api: Api) -> None:
    session, url = api
    body = b'{"type": "fail", "type": "echo", "payload": {"a": 1, "a": 2}}'
    status, job = await post_raw(session, f"{url}/jobs", body, JSON)
    assert status == 201, job
    done = await wait_for_state(session, url, job["id"], {"completed"})
    assert (done["type"], done["result"]) == ("echo", {"a": 2})


async def test_a_null_idempotency_key_beside_the_header_is_no_key(api: Api) -> None:
    session, url = api
    body = b'{"type": "echo", "idempotency_key": null}'
    first = await post_raw(session, f"{url}/jobs", body, {**JSON, "Idempotency-Key": "k-1"})
    again = await post_raw(session, f"{url}/jobs", body, {**JSON, "Idempotency-Key": "k-1"})
    assert (first[0], again[0]) == (201, 200)
    assert first[1]["id"] == again[1]["id"]


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A3", "1e2", "-1", " 5"])
async def test_listing_limits_are_ascii_decimal(api: Api, limit: str) -> None:
    session, url = api
    async with session.get(f"{url}/jobs?limit={limit}") as response:
        answer = await response.json()
        assert response.status == 400, answer
    assert answer["error"]["code"] == "invalid_query"


# ---------------------------------------------------------------- browsers


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_a_body_that_is_not_declared_json_is_refused(
    api: Api, redis: Redis, content_type: str
) -> None:
    """What a foreign page can send without a CORS preflight (a "simple" request)."""
    session, url = api
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/jobs", "/jobs/batch"):
        body = b'{"type": "echo"}' if path == "/jobs" else b'{"jobs": [{"type": "echo"}]}'
        async with session.post(f"{url}{path}", data=body, headers=headers) as response:
            answer = await response.json()
            assert response.status == 415, answer
        assert answer["error"]["code"] == "unsupported_media_type"
    assert await redis.keys("taskd:*:job:*") == []


async def test_a_write_from_another_origin_is_refused(api: Api, redis: Redis) -> None:
    session, url = api
    for origin in ("http://evil.example", "null", f"{url}.evil.example"):
        status, answer = await post_raw(
            session, f"{url}/jobs", b'{"type": "echo"}', {**JSON, "Origin": origin}
        )
        assert (status, answer["error"]["code"]) == (403, "forbidden_origin"), origin
    assert await redis.keys("taskd:*:job:*") == []
    # The daemon's own pages (the dashboard) and programs without an Origin may.
    status, _ = await post_raw(session, f"{url}/jobs", b'{"type": "echo"}', {**JSON, "Origin": url})
    assert status == 201
    assert (await post_raw(session, f"{url}/jobs", b'{"type": "echo"}', JSON))[0] == 201


async def test_a_rebound_host_name_is_misdirected(api: Api) -> None:
    """A page at evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    session, url = api
    port = url.rsplit(":", 1)[1]
    for path in ("/stats", "/jobs", "/"):
        async with session.get(f"{url}{path}", headers={"Host": f"evil.example:{port}"}) as r:
            answer = await r.json()
            assert r.status == 421, (path, answer)
        assert answer["error"]["code"] == "misdirected"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "taskd.localhost"):
        async with session.get(f"{url}/health", headers={"Host": host}) as r:
            assert r.status == 200, host


async def test_allowed_hosts_names_the_daemon_answers_to(redis_url: str) -> None:
    config = make_config(redis_url, server={"allowed_hosts": ["jobs.internal"]})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        port = url.rsplit(":", 1)[1]
        async with session.get(f"{url}/health", headers={"Host": f"jobs.internal:{port}"}) as r:
            assert r.status == 200
        async with session.get(f"{url}/health", headers={"Host": "other.internal"}) as r:
            assert r.status == 421
        status, _ = await get_json(session, f"{url}/stats")
        assert status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
    ],
    ids=["20 KB header", "bad request line", "bad header line"],
)
async def test_malformed_http_gets_the_json_error_and_one_log_line(
    api: Api, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    _, url = api
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        with anyio.fail_after(10):
            answer = await reader.read()  # the daemon closes the connection after it
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1].startswith(b"4"), head  # 400, or 431 for the header
    assert b"application/json" in head
    error = orjson.loads(body)["error"]
    assert error["code"] == "bad_request"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]
