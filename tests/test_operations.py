"""Operating taskd: the /stats document, pausing queues, the token, the event stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Store
from tests.support import (
    Api,
    base_url,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
    wait_until,
)

TOKEN = "s3cret-token-0123456789"


async def test_stats_document(api: Api) -> None:
    session, url = api
    ids = [(await post_json(session, f"{url}/jobs", {"type": "noop"}))[1]["id"] for _ in range(5)]
    for job_id in ids:
        await wait_for_state(session, url, job_id, {"completed"})

    started = time.perf_counter()
    status, stats = await get_json(session, f"{url}/stats")
    assert status == 200
    assert time.perf_counter() - started < 5  # a sanity bound, not a benchmark

    queue = stats["queues"]["default"]
    assert queue["completed"] == 5
    assert queue["paused"] is False
    assert {name: n for name, n in queue["totals"].items() if n} == {"enqueued": 5, "completed": 5}
    assert set(queue["throughput"]) == {"1m", "5m"}
    assert queue["wait_ms"]["p50"] is not None
    assert queue["wait_ms"]["p50"] <= queue["wait_ms"]["p99"]
    assert queue["run_ms"]["p99"] is not None
    [me] = stats["instances"]
    assert me["uptime_s"] >= 0
    assert 0 <= me["heartbeat_age_ms"] < 60_000
    assert stats["redis"]["version"] >= "6.2"
    assert stats["redis"]["used_memory"] > 0


async def test_stats_do_not_scan_keys(api: Api, redis: Redis) -> None:
    """Reading /stats touches bounded structures only: no KEYS or SCAN, whatever is stored."""
    session, url = api
    await redis.config_resetstat()
    await get_json(session, f"{url}/stats")
    commands = await redis.info("commandstats")
    assert not {"cmdstat_keys", "cmdstat_scan"} & set(commands)


async def test_a_paused_queue_takes_jobs_but_runs_none_until_resumed(api: Api) -> None:
    session, url = api
    status, body = await post_json(session, f"{url}/queues/default/pause", {})
    assert (status, body) == (200, {"queue": "default", "paused": True})
    _, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": 1})
    assert job["state"] == "queued"

    async def shows_paused() -> bool:
        _, stats = await get_json(session, f"{url}/stats")
        return bool(stats["queues"]["default"]["paused"])

    await wait_until(shows_paused, "/stats to show the queue paused")
    # Give the daemon time it would need to start the job, had the queue not been paused.
    with anyio.move_on_after(1.0):
        await wait_for_state(session, url, job["id"], {"active", "completed"})
    _, still = await get_json(session, f"{url}/jobs/{job['id']}")
    assert still["state"] == "queued"

    status, body = await post_json(session, f"{url}/queues/default/resume", {})
    assert body["paused"] is False
    assert (await wait_for_state(session, url, job["id"], {"completed"}))["result"] == 1


async def test_pausing_a_bad_queue_name_is_404(api: Api) -> None:
    session, url = api
    status, body = await post_json(session, f"{url}/queues/no%7Bbraces%7D/pause", {})
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_only_queues_that_exist_can_be_paused(api: Api, redis: Redis) -> None:
    session, url = api
    for n in range(50):
        status, body = await post_json(session, f"{url}/queues/made-up-{n}/pause", {})
        assert (status, body["error"]["code"]) == (404, "not_found")
    status, _ = await post_json(session, f"{url}/queues/made-up-1/resume", {})
    assert status == 404
    _, stats = await get_json(session, f"{url}/stats")
    assert list(stats["queues"]) == ["default"]  # nothing registered by the attempts
    assert await redis.keys("taskd:{made-up*") == []


async def test_an_empty_unserved_queue_can_be_forgotten(
    api: Api, store: Store, redis: Redis
) -> None:
    session, url = api
    await store.add_queues(["old", "busy"])  # as daemons that served them once did
    await store.pause("old")
    await store.enqueue(Job(new_id(), "echo", "busy", None, QUEUED, 0, now_ms()))
    _, stats = await get_json(session, f"{url}/stats")
    assert sorted(stats["queues"]) == ["busy", "default", "old"]

    async with session.delete(f"{url}/queues/old") as response:
        assert (response.status, await response.json()) == (
            200,
            {"queue": "old", "forgotten": True},
        )
    _, stats = await get_json(session, f"{url}/stats")
    assert sorted(stats["queues"]) == ["busy", "default"]
    assert await redis.keys("taskd:{old}*") == []
    for queue, why in [("busy", "still holds 1 jobs"), ("default", "in this daemon's config")]:
        async with session.delete(f"{url}/queues/{queue}") as response:
            answer = await response.json()
            assert response.status == 409, answer
        assert why in answer["error"]["message"]
    async with session.delete(f"{url}/queues/never") as response:
        assert response.status == 404


@pytest.fixture
async def guarded(redis_url: str) -> AsyncIterator[Api]:
    config = make_config(redis_url, server={"token": TOKEN})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        yield session, base_url(daemon)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/jobs"),
        ("POST", "/queues/default/pause"),
        ("DELETE", "/jobs/x"),
        ("GET", "/jobs"),
        ("GET", "/jobs/x"),
        ("GET", "/dead"),
        ("GET", "/archive"),
        ("GET", "/stats"),
        ("GET", "/schedules"),
        ("GET", "/events"),
    ],
)
async def test_the_token_guards_every_write_and_read(guarded: Api, method: str, path: str) -> None:
    session, url = guarded
    async with session.request(method, f"{url}{path}", json={"type": "noop"}) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer nope"}
    async with session.request(method, f"{url}{path}", headers=wrong) as response:
        assert response.status == 401
    # Never in the URL: URLs end up in logs and browser histories.
    async with session.request(method, f"{url}{path}?token={TOKEN}") as response:
        assert response.status == 401


async def test_the_token_opens_everything_and_probes_stay_open(guarded: Api) -> None:
    session, url = guarded
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(f"{url}/jobs", json={"type": "noop"}, headers=headers) as response:
        assert response.status == 201
    for path in ("/stats", "/jobs", "/dead"):
        async with session.get(f"{url}{path}", headers=headers) as response:
            assert response.status == 200, path
    # The page and its files hold no data (the page asks for the token); probes need none.
    for path in ("/", "/static/app.js", "/health", "/metrics"):
        async with session.get(f"{url}{path}") as response:
            assert response.status == 200, path


@pytest.mark.parametrize(
    ("settings", "open_paths", "closed_paths"),
    [
        ({"public_reads": True}, ["/stats", "/jobs", "/dead", "/health"], []),
        ({"public_health": False, "public_metrics": False}, [], ["/health", "/metrics"]),
    ],
)
async def test_what_stays_open_with_a_token_is_configurable(
    redis_url: str, settings: dict[str, bool], open_paths: list[str], closed_paths: list[str]
) -> None:
    config = make_config(redis_url, server={"token": TOKEN, **settings})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        for path in open_paths:
            async with session.get(f"{url}{path}") as response:
                assert response.status == 200, path
        for path in closed_paths:
            async with session.get(f"{url}{path}") as response:
                assert response.status == 401, path
        # public_reads opens reads only: writes still need the token.
        async with session.post(f"{url}/jobs", json={"type": "noop"}) as response:
            assert response.status == 401


async def test_the_event_stream_sends_a_picture_every_second(api: Api) -> None:
    session, url = api
    await post_json(session, f"{url}/jobs", {"type": "fail", "max_attempts": 1})
    pictures: list[dict[str, Any]] = []
    async with session.get(f"{url}/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        with anyio.fail_after(20):
            async for line in response.content:
                if line.startswith(b"data: "):
                    pictures.append(orjson.loads(line[6:]))
                    if len(pictures) == 3 and pictures[-1]["failed"]:
                        break
                    pictures = pictures[-2:]
    last = pictures[-1]
    assert set(last) == {"stats", "recent", "failed", "schedules", "archive"}
    assert last["archive"] is False  # no [archive]: the History card says so
    assert last["stats"]["queues"]["default"]["failed"] == 1
    assert last["failed"][0]["state"] == "failed"


async def test_the_dashboard_page_is_served(api: Api) -> None:
    session, url = api
    async with session.get(f"{url}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
    async with session.get(f"{url}/static/..%2Fjobs.py") as response:
        assert response.status == 404


async def test_metrics_count_what_this_daemon_did(api: Api) -> None:
    session, url = api
    for job_type in ("echo", "fail"):
        _, job = await post_json(session, f"{url}/jobs", {"type": job_type, "max_attempts": 1})
        await wait_for_state(session, url, job["id"], {"completed", "failed"})
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    default = ("queue", "default")
    assert samples[("taskd_jobs_enqueued_total", (default, ("type", "echo")))] == 1
    assert samples[("taskd_jobs_completed_total", (default, ("type", "echo")))] == 1
    assert samples[("taskd_jobs_failed_total", (default, ("type", "fail")))] == 1
    assert samples[("taskd_queue_jobs", (default, ("state", "completed")))] == 1
    assert samples[("taskd_job_wait_seconds_count", (default,))] == 2
    assert samples[("taskd_daemons_live", ())] == 1
    assert samples[("taskd_daemon_concurrency", ())] == 10
