"""The Python client, `Client` and `AsyncClient` alike, against real daemons on the test Redis."""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from taskd import jobs
from taskd.client import (
    AsyncClient,
    Client,
    Conflict,
    DaemonError,
    InvalidRequest,
    Job,
    NotFound,
    TaskdError,
    TransportError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from taskd.client.core import FINAL_STATES
from taskd.client.errors import error_of
from taskd.daemon import Daemon
from taskd.embedded import RedisServer
from tests.proxy import Proxy
from tests.support import Api, fill, make_config, running_daemon, wait_until

TOKEN = "a-token-of-24-characters"
RESENT = "sending it again"


class Calls:
    """One client's calls, awaited whichever it is: the AsyncClient's as they are, the
    Client's in a worker thread (the daemons under test run in this event loop)."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        if isinstance(self.client, AsyncClient):
            return method
        return functools.partial(asyncio.to_thread, method)

    async def every_job(self, **filters: Any) -> list[Job]:
        """iter_jobs, to the end."""
        if isinstance(self.client, AsyncClient):
            return [job async for job in self.client.iter_jobs(**filters)]
        client = self.client
        return await asyncio.to_thread(lambda: list(client.iter_jobs(**filters)))


Connect = Callable[..., Calls]


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """`connect(url, **options)`: a client of the test's kind, closed after the test."""
    opened: list[Calls] = []

    def open_one(url: str, **options: Any) -> Calls:
        kind = Client if request.param == "sync" else AsyncClient
        opened.append(Calls(kind(url, **options)))
        return opened[-1]

    yield open_one
    for calls in opened:
        await calls.close()


@pytest.fixture
def client(connect: Connect, api: Api) -> Calls:
    """A client of the `daemon` fixture's daemon."""
    return connect(api[1])


@pytest.fixture
async def front(daemon: Daemon) -> AsyncIterator[Proxy]:
    """A TCP proxy in front of the `daemon` fixture's daemon."""
    host, port = daemon.api.addresses[0][:2]
    proxy = Proxy(host, port)
    await proxy.start()
    yield proxy
    await proxy.close()


def url_of(proxy: Proxy) -> str:
    return f"http://127.0.0.1:{proxy.port}"


async def test_submit_returns_the_job_and_wait_its_outcome(client: Calls) -> None:
    job = await client.submit("echo", {"x": 1})
    assert (job["type"], job["queue"], job["state"]) == ("echo", "default", "queued")
    assert (job["payload"], job["priority"], job["max_attempts"]) == ({"x": 1}, 5, 3)
    # The client keyed it, so that it can send it again: a key of its own making.
    assert uuid.UUID(job["idempotency_key"] or "").version == 4
    assert set(job) == set(Job.__annotations__)  # the type follows the document

    done = await client.wait(job["id"], timeout=20)
    assert (done["state"], done["result"], done["attempts"]) == ("completed", {"x": 1}, 1)
    assert await client.get(job["id"]) == done


async def test_submit_takes_every_option_of_the_api(client: Calls) -> None:
    later = await client.submit(
        "echo", delay=timedelta(seconds=60), priority=9, max_attempts=2, idempotency_key="k-1"
    )
    assert (later["state"], later["priority"], later["max_attempts"]) == ("scheduled", 9, 2)
    assert later["idempotency_key"] == "k-1"
    # The same key again: nothing new, the first job.
    assert (await client.submit("echo", delay=60, idempotency_key="k-1"))["id"] == later["id"]

    when = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    at_time = await client.submit(
        "echo", run_at=when.astimezone(), callback_url="http://127.0.0.1:9/"
    )
    assert at_time["run_at"] == when.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert at_time["callback_url"] == "http://127.0.0.1:9/"
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.submit("echo", run_at=datetime.now())


async def test_submit_many_answers_the_ids_in_order(client: Calls) -> None:
    ids = await client.submit_many(
        [
            {"type": "echo", "payload": 1},
            {"type": "echo", "payload": 2, "delay": 60, "idempotency_key": "batch-2"},
            {"type": "noop", "priority": 0},
        ]
    )
    jobs = [await client.get(job_id) for job_id in ids]
    assert [(j["type"], j["payload"]) for j in jobs] == [("echo", 1), ("echo", 2), ("noop", None)]
    assert jobs[1]["state"] == "scheduled"
    # A repeated key answers the first job's id.
    again = await client.submit_many([{"type": "echo", "idempotency_key": "batch-2"}])
    assert again == [ids[1]]


async def test_a_batch_with_a_bad_job_is_refused_whole_naming_it(client: Calls) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await client.submit_many([{"type": "echo"}, {"type": "echo"}, {"type": "resize"}])
    error = caught.value
    assert (error.status, error.code, error.index) == (422, "unknown_type", 2)
    assert error.message.startswith("jobs[2]: unknown job type 'resize'")
    assert await client.every_job() == []


async def test_cancel_retry_and_delete(client: Calls) -> None:
    waiting = await client.submit("echo", delay=60)
    cancelled = await client.cancel(waiting["id"])
    assert cancelled["state"] == "cancelled"
    with pytest.raises(Conflict) as caught:
        await client.cancel(waiting["id"])
    assert (caught.value.status, caught.value.code) == (409, "conflict")
    assert "is cancelled" in caught.value.message

    failed = await client.wait((await client.submit("fail", max_attempts=1))["id"], timeout=20)
    assert failed["state"] == "failed"
    again = await client.retry(failed["id"])
    assert (again["state"], again["attempts"]) in {("queued", 0), ("active", 1), ("failed", 1)}
    with pytest.raises(Conflict, match="only a failed job can be retried"):
        await client.retry(cancelled["id"])

    assert await client.delete(cancelled["id"]) is None
    with pytest.raises(NotFound) as missing:
        await client.get(cancelled["id"])
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert str(missing.value) == f"404 not_found: no job with id '{cancelled['id']}'"


async def test_list_pages_and_iter_jobs_follows_them(client: Calls) -> None:
    ids = await client.submit_many([{"type": "echo", "delay": 60, "payload": n} for n in range(5)])
    await client.submit("noop", delay=60)
    page = await client.list(type="echo", limit=2)
    assert [job["id"] for job in page.jobs] == ids[::-1][:2]  # newest first
    assert page.next_cursor is not None
    rest = await client.list(type="echo", limit=10, cursor=page.next_cursor)
    assert [job["id"] for job in rest.jobs] == ids[::-1][2:]

    every = await client.every_job(state="scheduled", queue="default", type="echo", page_size=2)
    assert [job["id"] for job in every] == ids[::-1]
    assert len(await client.every_job()) == 6
    assert await client.every_job(state="completed") == []
    with pytest.raises(InvalidRequest) as caught:
        await client.list(state="finished")
    assert (caught.value.status, caught.value.code) == (400, "invalid_query")


async def test_stats_pause_and_resume(client: Calls) -> None:
    stats = await client.stats()
    assert stats["queues"]["default"]["paused"] is False
    assert len(stats["instances"]) == 1
    assert await client.pause("default") == {"queue": "default", "paused": True}
    assert (await client.stats())["queues"]["default"]["paused"] is True
    assert await client.resume("default") == {"queue": "default", "paused": False}
    with pytest.raises(NotFound, match="no queue 'elsewhere'"):
        await client.pause("elsewhere")


async def test_purge_and_retry_dead(client: Calls) -> None:
    for _ in range(2):
        await client.submit("echo", delay=60)
    purged = await client.purge("default", "scheduled")
    assert purged == {"queue": "default", "state": "scheduled", "removed": 2}
    assert await client.every_job() == []
    failed = await client.wait((await client.submit("fail", max_attempts=1))["id"], timeout=20)
    assert failed["state"] == "failed"
    retried = await client.retry_dead(type="fail", queue="default")
    assert retried == {"retried": 1, "queue": "default", "type": "fail"}
    assert (await client.get(failed["id"]))["history"][0]["outcome"] == "failed"
    with pytest.raises(InvalidRequest, match="'state' must be one of queued, scheduled"):
        await client.purge("default", "active")
    with pytest.raises(NotFound, match="no queue 'elsewhere'"):
        await client.purge("elsewhere", "queued")
    with pytest.raises(NotFound, match="no queue 'elsewhere'"):
        await client.retry_dead(queue="elsewhere")


async def test_wait_gives_up_with_the_job_as_last_seen(client: Calls) -> None:
    job = await client.submit("echo", delay=60)
    with pytest.raises(WaitTimeout) as caught:
        await client.wait(job["id"], timeout=0.3)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.job["state"] == "scheduled"
    assert str(caught.value) == f"job {job['id']} is still scheduled after 0.3 s"


async def test_error_answers_are_exceptions_with_status_code_and_message(client: Calls) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await client.submit("resize")
    error = caught.value
    assert (error.status, error.code, error.index) == (422, "unknown_type", None)
    assert str(error).startswith("422 unknown_type: unknown job type 'resize'; configured types:")
    with pytest.raises(InvalidRequest, match="'priority' must be an integer from 0"):
        await client.submit("echo", priority=12)
    with pytest.raises(NotFound):
        await client.cancel("01a20d20-0000-7000-8000-000000000000")
    # An id is one path segment, whatever it holds.
    with pytest.raises(NotFound, match=r"no job with id '\.\./stats'"):
        await client.get("../stats")


@pytest.mark.daemon_config(server={"token": TOKEN})
async def test_the_token_from_the_argument_or_the_environment(
    connect: Connect, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKD_TOKEN", raising=False)
    with pytest.raises(Unauthorized) as caught:
        await connect(api[1]).stats()
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    assert "queues" in await connect(api[1], token=TOKEN).stats()
    monkeypatch.setenv("TASKD_TOKEN", TOKEN)
    assert "queues" in await connect(api[1]).stats()


async def test_requests_share_one_keep_alive_connection(
    connect: Connect, api: Api, daemon: Daemon
) -> None:
    client = connect(api[1])
    job = await client.submit("echo", delay=60)
    for _ in range(5):
        await client.get(job["id"])
    assert daemon.api.open_connections == 1
    await client.close()
    await wait_until(
        lambda: _now(daemon.api.open_connections == 0), "close() to close its connection"
    )
    with pytest.raises(TaskdError, match="the client is closed"):
        await client.get(job["id"])


@pytest.mark.daemon_config(server={"keepalive_timeout": 0.2})
async def test_a_connection_the_daemon_closed_while_idle_is_not_used(
    connect: Connect, api: Api, daemon: Daemon
) -> None:
    # No resends: a cancel on the closed connection would fail, not be sent again.
    client = connect(api[1], retries=0)
    job = await client.submit("echo", delay=60)
    seen_closed = 0

    async def closed_a_poll_ago() -> bool:
        # Closed on two polls running: between them this event loop, which runs the daemon
        # as well, has had a turn to tell the client's end, as a daemon apart would have.
        nonlocal seen_closed
        seen_closed = seen_closed + 1 if daemon.api.open_connections == 0 else 0
        return seen_closed >= 2

    await wait_until(closed_a_poll_ago, "the daemon to close the idle connection")
    assert (await client.cancel(job["id"]))["state"] == "cancelled"


async def test_a_submission_whose_answer_was_lost_is_sent_again_and_makes_one_job(
    connect: Connect, front: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskd.client.core")
    client = connect(url_of(front))
    front.drop_answers(1)
    job = await client.submit("echo", delay=60)
    assert [r.message for r in caplog.records if RESENT in r.message] != []
    front.drop_answers(1)
    ids = await client.submit_many([{"type": "echo", "delay": 60}, {"type": "noop"}])
    assert len(ids) == 2
    jobs = await client.every_job()
    assert sorted(j["id"] for j in jobs) == sorted([job["id"], *ids])


async def test_without_resends_a_lost_answer_is_an_error_and_the_job_exists(
    connect: Connect, front: Proxy
) -> None:
    client = connect(url_of(front), retries=0)
    front.drop_answers(1)
    with pytest.raises(TransportError) as caught:
        await client.submit("echo", delay=60)
    assert caught.value.sent is True
    assert "dropped before it answered" in str(caught.value)
    assert len(await client.every_job()) == 1


async def test_reads_are_sent_again_and_a_cancel_is_not(connect: Connect, front: Proxy) -> None:
    client = connect(url_of(front))
    job = await client.submit("echo", delay=60)
    front.drop_answers(1)
    assert (await client.get(job["id"]))["id"] == job["id"]
    front.drop_answers(1)
    assert len((await client.list()).jobs) == 1

    # A second cancel would answer 409, as if the first had come too late: the caller is
    # told the request went out and its outcome is unknown.
    front.drop_answers(1)
    with pytest.raises(TransportError) as caught:
        await client.cancel(job["id"])
    assert caught.value.sent is True
    assert (await client.get(job["id"]))["state"] == "cancelled"


async def test_a_delete_is_sent_again_and_then_finds_the_job_gone(
    connect: Connect, front: Proxy
) -> None:
    client = connect(url_of(front))
    job = await client.submit("echo", delay=60)
    front.drop_answers(1)
    with pytest.raises(NotFound):
        await client.delete(job["id"])
    assert await client.every_job() == []


async def test_nothing_listening_is_a_transport_error_after_the_resends(
    connect: Connect, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskd.client.core")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TransportError) as caught:
        await connect(url, retries=2).retry("01a20d20-0000-7000-8000-000000000000")
    # Not even a retry reached a daemon: sending it again was safe.
    assert caught.value.sent is False
    assert str(caught.value) == f"cannot reach the daemon at {url}: Connection refused"
    assert len([r for r in caplog.records if RESENT in r.message]) == 2


async def test_a_full_redis_is_unavailable_and_retry_after_is_waited_for(
    connect: Connect, small_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskd.client.core")
    redis = Redis.from_url(small_redis.url)
    try:
        async with running_daemon(make_config(small_redis.url)) as daemon:
            url = f"http://127.0.0.1:{daemon.api.addresses[0][1]}"
            await fill(redis)
            with pytest.raises(Unavailable) as caught:
                await connect(url, retries=0).submit("echo")
            error = caught.value
            assert (error.status, error.code, error.retry_after) == (503, "storage_full", 5.0)

            submitted = asyncio.ensure_future(connect(url, retries=2).submit("echo"))
            await wait_until(
                lambda: _now(any(RESENT in r.message for r in caplog.records)),
                "the client to wait the Retry-After",
            )
            await redis.config_set("maxmemory", 0)
            job = await submitted
            assert job["state"] in ("queued", "active", "completed")
    finally:
        await redis.aclose()


async def test_a_daemon_on_a_unix_socket_found_through_its_config(
    connect: Connect, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKD_URL", raising=False)
    monkeypatch.delenv("TASKD_TOKEN", raising=False)
    listen = f"unix:{tmp_path / 'taskd.sock'}"
    config = tmp_path / "taskd.toml"
    config.write_text(f'[server]\nlisten = "{listen}"\ntoken = "{TOKEN}"\n')
    server = {"listen": listen, "token": TOKEN}
    async with running_daemon(make_config(redis_url, server=server)):
        client = connect(None, config=str(config))
        assert client.client.url == listen
        job = await client.submit("echo", [1])
        assert (await client.wait(job["id"], timeout=20))["result"] == [1]
        assert len((await client.stats())["instances"]) == 1


async def test_threads_share_one_client(api: Api, daemon: Daemon) -> None:
    with Client(api[1]) as client:
        submits = (asyncio.to_thread(client.submit, "echo", n, delay=60) for n in range(20))
        jobs = await asyncio.gather(*submits)
        assert 1 <= daemon.api.open_connections <= 20
    assert sorted(job["payload"] for job in jobs) == list(range(20))
    assert len({job["id"] for job in jobs}) == 20


async def _now(value: bool) -> bool:
    return value


def test_import_taskd_does_not_import_the_client() -> None:
    """`import taskd` stays cheap: the daemon's modules import it, and so does every
    `from taskd import Client`, which needs neither aiohttp nor the config model."""
    code = (
        "import sys, taskd; assert 'taskd.client' not in sys.modules\n"
        "from taskd import Client, NotFound; assert 'aiohttp' not in sys.modules\n"
        "assert 'taskd.config' not in sys.modules\n"
        "from taskd import AsyncClient; assert 'aiohttp' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_error_answer_not_from_taskd_keeps_its_status_and_text() -> None:
    error = error_of(502, "Bad Gateway", b"<html> upstream\n  gone </html>", "5")
    assert type(error) is DaemonError
    assert (error.status, error.code, error.retry_after) == (502, None, 5.0)
    assert str(error) == "502 Bad Gateway: <html> upstream gone </html>"
    body = b'{"error": {"code": "x", "message": "jobs[12]: y"}}'
    refused = error_of(422, "Unprocessable", body, None)
    assert isinstance(refused, InvalidRequest)
    assert (refused.code, refused.index, refused.retry_after) == ("x", 12, None)


def test_final_states_are_the_daemons() -> None:
    assert set(FINAL_STATES) == set(jobs.FINAL_STATES)


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="not a daemon URL"):
        Client("ftp://example.org")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        Client("http://127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="retries must be a whole number"):
        AsyncClient("http://127.0.0.1:1", retries=-1)
