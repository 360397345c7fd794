"""Callbacks: a finished job's final record is POSTed to its callback_url, with retries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from redis.asyncio import Redis

from taskd.config import Config
from taskd.daemon import Daemon
from taskd.jobs import Job, now_ms
from taskd.store import Keys, Store
from tests import handler_funcs
from tests.builders import done, new_job, write_daemon_config
from tests.support import (
    ECHO,
    REPO,
    DaemonProcess,
    base_url,
    get_json,
    indexed_ids,
    make_config,
    post_json,
    running_daemon,
    wait_healthy,
    wait_until,
)

K = Keys("taskd")
web_handler = Callable[[web.Request], Awaitable[web.Response]]


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


@asynccontextmanager
async def endpoint(handle: web_handler, port: int) -> AsyncIterator[str]:
    """A real HTTP endpoint on 127.0.0.1:`port` whose /hook runs `handle`; its URL."""
    app = web.Application()
    app.router.add_route("*", "/hook", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@pytest.fixture
async def receiver(free_port: Any) -> AsyncIterator[Receiver]:
    recv = Receiver()
    async with endpoint(recv.handle, free_port()) as recv.url:
        yield recv


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
        # An unclosed IPv6 bracket made urlsplit raise: a 500, found by test_fuzz.
        # A host with a space or a NUL could never be sent to: refused too (also found so).
        for bad in (
            "ftp://x/y", "not a url", 7, "https://[x", "http://[::1/hook", "http://a b/",
            "http://a\x00b/", "http://a%20b/", "http://a\tb.example/",
        ):  # fmt: skip
            status, body = await post_json(
                s, f"{base_url(daemon)}/jobs", {"type": "echo", "callback_url": bad}
            )
            assert (status, body["error"]["code"]) == (422, "invalid_job")


# Where callbacks may go: [callbacks] allow / deny.

REFUSED_AT_SUBMISSION = [
    ("http://127.0.0.1:9/hook", "destination 127.0.0.1 refused by [callbacks] allow/deny"),
    ("http://169.254.169.254/latest/meta-data/", "destination 169.254.169.254 refused"),
    ("http://[::ffff:127.0.0.1]:9/", "destination ::ffff:7f00:1 (IPv4 127.0.0.1) refused"),
    ("http://10.0.0.7/hook", "destination 10.0.0.7 refused"),
    ("http://localhost:9/hook", "destination localhost (loopback) refused"),
    ("http://hooks.localhost./x", "destination hooks.localhost (loopback) refused"),
    ("https://me:secret@example.com/", "a user name or password in the URL is refused"),
]


@pytest.mark.parametrize(("url", "message"), REFUSED_AT_SUBMISSION)
async def test_by_default_callbacks_to_the_host_and_its_networks_are_refused(
    redis_url: str, redis: Redis, url: str, message: str
) -> None:
    config = make_config(redis_url, callbacks={"allow": []})  # the default policy
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        status, body = await post_json(
            session, f"{base_url(daemon)}/jobs", {"type": "echo", "callback_url": url}
        )
        batch = [{"type": "echo"}, {"type": "echo", "callback_url": url}]
        batch_status, batch_body = await post_json(
            session, f"{base_url(daemon)}/jobs/batch", {"jobs": batch}
        )
    assert (status, body["error"]["code"]) == (422, "invalid_job")
    assert body["error"]["message"].startswith("'callback_url' refused: ")
    assert message in body["error"]["message"]
    assert "secret" not in body["error"]["message"]
    assert (batch_status, batch_body["error"]["code"]) == (422, "invalid_job")
    assert batch_body["error"]["message"].startswith("jobs[1]: 'callback_url' refused: ")
    assert len(await indexed_ids(redis, "default")) == 0  # nothing was written


async def test_allow_lets_callbacks_reach_an_internal_network_but_never_credentials(
    redis_url: str,
) -> None:
    config = make_config(redis_url, callbacks={"allow": ["127.0.0.0/8", "10.0.0.0/8"]})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = f"{base_url(daemon)}/jobs"
        for permitted in ("http://127.0.0.1:9/hook", "http://10.0.0.7/hook"):
            status, _ = await post_json(session, url, {"type": "noop", "callback_url": permitted})
            assert status == 201
        status, body = await post_json(
            session, url, {"type": "noop", "callback_url": "http://me:pw@127.0.0.1:9/"}
        )
    assert (status, body["error"]["code"]) == (422, "invalid_job")


async def test_deny_refuses_a_public_destination(redis_url: str) -> None:
    config = make_config(redis_url, callbacks={"deny": ["93.184.216.0/24"]})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = f"{base_url(daemon)}/jobs"
        body = {"type": "noop", "callback_url": "https://93.184.216.34/hook"}
        status, answer = await post_json(session, url, body)
        # A name is not resolved at submission: it is checked when the callback is sent.
        named = {"type": "noop", "delay": 60, "callback_url": "https://hooks.example.com/"}
        named_status, _ = await post_json(session, url, named)
    assert (status, answer["error"]["code"]) == (422, "invalid_job")
    assert named_status == 201


async def test_a_callback_the_sending_daemon_refuses_fails_at_once(
    redis_url: str, receiver: Receiver, redis: Redis
) -> None:
    """Accepted by a daemon that allows 127.0.0.1, sent by one that does not: the sender
    checks again, and fails the callback without trying the endpoint (or again later)."""
    lenient = make_config(redis_url, workers={"queues": ["elsewhere"]})
    strict = make_config(redis_url, callbacks={"allow": []})
    async with running_daemon(lenient) as intake, running_daemon(strict) as sender:
        job = await submit(base_url(intake), {"type": "echo", "callback_url": receiver.url})

        async def counted() -> bool:
            return await redis.hget(K.totals("default"), "callbacks_failed") == b"1"

        await wait_until(counted, "the refused callback to be counted")
        assert sender.callbacks.queued == 1
        assert intake.callbacks.queued == 0
    assert await redis.hget(K.job("default", job["id"]), "state") == b"completed"
    assert (receiver.received, receiver.refused) == ([], 0)


async def test_a_callback_answered_with_a_redirect_is_not_followed(
    redis_url: str, free_port: Any, redis: Redis
) -> None:
    asked: list[str] = []  # the requests each endpoint got, by method

    async def redirect(request: web.Request) -> web.Response:
        asked.append(f"hook {request.method}")
        return web.Response(status=302, headers={"Location": target})

    async def elsewhere(request: web.Request) -> web.Response:
        asked.append(f"elsewhere {request.method}")
        return web.Response(status=204)

    async with (
        endpoint(elsewhere, free_port()) as target,
        endpoint(redirect, free_port()) as hook,
        running_daemon(make_config(redis_url)) as daemon,
    ):
        await submit(base_url(daemon), {"type": "noop", "callback_url": hook})

        async def counted() -> bool:
            return await redis.hget(K.totals("default"), "callbacks_failed") == b"1"

        await wait_until(counted, "the redirected callback to fail")
    assert asked == ["hook POST"] * 4  # every attempt failed; none went elsewhere


def gated_config(redis_url: str, concurrency: int) -> Config:
    handlers = {"gated": {"python": "tests.handler_funcs:gated"}}
    return make_config(redis_url, handlers=handlers, workers={"concurrency": concurrency})


async def totals(url: str) -> dict[str, int]:
    """The default queue's totals, from `url`'s /stats."""
    async with aiohttp.ClientSession() as session:
        _, stats = await get_json(session, f"{url}/stats")
    return dict(stats["queues"]["default"]["totals"])


async def cancel(url: str, job_id: str) -> int:
    async with aiohttp.ClientSession() as session:
        status, _ = await post_json(session, f"{url}/jobs/{job_id}/cancel", {})
    return status


async def running_on(redis: Redis, daemon: Daemon, job_ids: list[str]) -> str:
    """One of these jobs that runs on `daemon`."""
    active = {
        m.decode() for m in await redis.zrange(K.active("default", daemon.identity.id), 0, -1)
    }
    return next(job_id for job_id in job_ids if job_id in active)


Outcomes = dict[str, tuple[str, Any]]  # job id -> the state and result its callback reports


async def fill_slots(urls: list[str], hook: str, gauge: handler_funcs.Gauge) -> Outcomes:
    """20 jobs held at the gate in 2 x 10 slots: each daemon runs 10 of them."""
    held = [
        await submit(urls[i % 2], {"type": "gated", "payload": i, "callback_url": hook})
        for i in range(20)
    ]
    await wait_until(lambda: _running(gauge, 20), "both daemons to fill their slots")
    return {job["id"]: ("completed", job["payload"]) for job in held}


async def cancel_across(redis: Redis, daemons: tuple[Daemon, Daemon], ids: list[str]) -> Outcomes:
    """Cancel a job running on each daemon through the other one."""
    cancelled: Outcomes = {}
    for runner, other in (daemons, daemons[::-1]):
        job_id = await running_on(redis, runner, ids)
        assert await cancel(base_url(other), job_id) == 202
        cancelled[job_id] = ("cancelled", None)
    return cancelled


async def end_more(urls: list[str], hook: str) -> Outcomes:
    """A waiting job cancelled through the other daemon, 9 failing and 10 echo jobs."""
    waiting = await submit(urls[1], {"type": "echo", "delay": 60, "callback_url": hook})
    assert await cancel(urls[0], waiting["id"]) == 200
    ends: Outcomes = {waiting["id"]: ("cancelled", None)}
    for i in range(19):
        body = {"type": "echo", "payload": i} if i % 2 else {"type": "fail", "max_attempts": 1}
        job = await submit(urls[i % 2], {**body, "callback_url": hook})
        ends[job["id"]] = ("completed", i) if i % 2 else ("failed", None)
    return ends


async def test_two_daemons_call_back_every_job_exactly_once(
    redis_url: str, receiver: Receiver, redis: Redis
) -> None:
    gauge = handler_funcs.reset_gauge()
    config = gated_config(redis_url, concurrency=10)
    async with running_daemon(config) as a, running_daemon(config) as b:
        urls = [base_url(a), base_url(b)]
        expected = await fill_slots(urls, receiver.url, gauge)
        expected |= await cancel_across(redis, (a, b), list(expected))
        expected |= await end_more(urls, receiver.url)
        gauge.gate.set()
        await wait_until(lambda: _sent(urls[1], 40), "40 callbacks, counted")
        assert (await totals(urls[0]))["callbacks_sent"] == 40
    by_id = {record["id"]: record for record in receiver.received}
    assert len(receiver.received) == len(by_id) == len(expected) == 40
    assert {i: (r["state"], r["result"]) for i, r in by_id.items()} == expected
    ran_on = {r["history"][-1]["daemon"] for r in by_id.values() if r["history"]}
    assert ran_on == {a.identity.id, b.identity.id}


async def _running(gauge: handler_funcs.Gauge, count: int) -> bool:
    return gauge.running == count


async def _sent(url: str, count: int) -> bool:
    return (await totals(url)).get("callbacks_sent", 0) >= count


async def test_a_callback_failing_on_two_daemons_is_counted_and_changes_nothing(
    redis_url: str, receiver: Receiver
) -> None:
    receiver.failures = 1000
    gauge = handler_funcs.reset_gauge()
    config = gated_config(redis_url, concurrency=1)
    async with running_daemon(config) as a, running_daemon(config) as b:
        urls = [base_url(a), base_url(b)]
        body = {"type": "gated", "payload": "kept", "callback_url": receiver.url}
        jobs = [await submit(url, body) for url in urls]
        # One slot each, two jobs at the gate: one runs on each daemon.
        await wait_until(lambda: _running(gauge, 2), "a job on each daemon")
        gauge.gate.set()

        async def both_counted() -> bool:
            return (await totals(urls[0])).get("callbacks_failed") == 2

        await wait_until(both_counted, "two failed callbacks, counted")
        assert (await totals(urls[1]))["callbacks_failed"] == 2
        async with aiohttp.ClientSession() as session:
            records = [(await get_json(session, f"{urls[1]}/jobs/{job['id']}"))[1] for job in jobs]
    assert {record["history"][0]["daemon"] for record in records} == {a.identity.id, b.identity.id}
    assert [(r["state"], r["result"]) for r in records] == [("completed", "kept")] * 2
    assert receiver.received == []
    assert receiver.refused == 8  # every attempt of both, and nothing more


async def test_an_attempt_taken_back_from_its_daemon_sends_no_callback(
    redis_url: str, receiver: Receiver, store: Store
) -> None:
    """Daemon A's attempt is taken back while it runs and B runs the job again: only B's
    attempt, the one Redis records, calls back."""
    handler_funcs.RUNS.clear()
    handlers = {"steps": {"python": "tests.handler_funcs:stepped"}}
    config = make_config(redis_url, handlers=handlers, workers={"concurrency": 1})
    async with running_daemon(config) as a:
        job = await submit(base_url(a), {"type": "steps", "callback_url": receiver.url})
        await wait_until(lambda: _runs(1), "A to start the job")
        async with running_daemon(config) as b:
            assert await store.requeue("default", a.identity.id, [job["id"]], now_ms()) == 1
            await wait_until(lambda: _runs(2), "B to start the job again")
            stale, fresh = handler_funcs.RUNS
            stale.go.set()
            await wait_until(lambda: _idle(a), "A's stale attempt to end")
            fresh.go.set()
            await wait_until(lambda: _sent(base_url(b), 1), "B's callback")
            assert (a.callbacks.queued, b.callbacks.queued) == (0, 1)
    [record] = receiver.received
    assert (record["state"], record["result"], record["daemon"]) == ("completed", 1, b.identity.id)


async def _runs(count: int) -> bool:
    return len(handler_funcs.RUNS) == count


async def _idle(daemon: Daemon) -> bool:
    return daemon.pool.active == 0


# Durable callbacks: the outbox in Redis, taken, returned and recovered.


def with_callback(n: int, url: str | None = "http://127.0.0.1:9/hook") -> Job:
    return new_job(payload=n, max_attempts=1, callback_url=url)


async def test_ending_scripts_fill_the_outbox_and_a_reaper_returns_what_was_in_flight(
    store: Store, redis: Redis
) -> None:
    jobs = [with_callback(n) for n in range(4)] + [with_callback(4, url=None)]
    await store.enqueue_many(jobs)
    claimed = {
        j.id: j for j in (await store.claim("default", "dead", 5, now=10, type_limits=ECHO)).jobs
    }
    ends = [done(claimed[jobs[0].id], "completed"), done(claimed[jobs[1].id], "failed")]
    ends.append(done(claimed[jobs[4].id], "completed"))  # no callback_url: not called back
    assert await store.ack("default", "dead", ends, now=11) == [True] * 3
    assert await store.cancel("default", jobs[2].id, now=12) == "active"
    assert await store.requeue_inflight("default", "dead", now=13) == 2  # 2 cancelled, 3 back
    outbox = [jobs[0].id, jobs[1].id, jobs[2].id]
    assert await store.take_callbacks("default", "dead", 10, now=14) == outbox
    assert await store.callback_done("default", "dead", jobs[0].id, "sent")
    # The daemon dies with two callbacks in flight: a reaper returns them to the outbox.
    assert await store.recover("default", "dead", now=100, before=50) == 0
    assert not await store.callback_done("default", "dead", jobs[1].id, "failed")
    assert await store.take_callbacks("default", "live", 10, now=101) == outbox[1:]
    assert await store.callback_done("default", "live", jobs[1].id, "failed")
    assert await store.callback_done("default", "live", jobs[2].id, "returned")
    assert await store.take_callbacks("default", "live", 10, now=102) == [jobs[2].id]
    totals = await redis.hgetall(K.totals("default"))
    assert (totals[b"callbacks_sent"], totals[b"callbacks_failed"]) == (b"1", b"1")


@dataclass
class SlowReceiver:
    """An endpoint that takes requests in but answers none until `gate` is set."""

    url: str = ""
    arrived: int = 0
    answered: list[str] = field(default_factory=list)
    gate: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived += 1
        await self.gate.wait()
        self.answered.append((await request.json())["id"])
        return web.Response(status=204)


@pytest.fixture
async def slow_receiver(free_port: Any) -> AsyncIterator[SlowReceiver]:
    recv = SlowReceiver()
    async with endpoint(recv.handle, free_port()) as recv.url:
        yield recv
        recv.gate.set()


async def test_a_stopping_daemon_leaves_its_unsent_callbacks_to_another(
    redis_url: str, slow_receiver: SlowReceiver, redis: Redis
) -> None:
    config = make_config(redis_url)
    async with running_daemon(config) as first:
        job = await submit(base_url(first), {"type": "echo", "callback_url": slow_receiver.url})
        await wait_until(lambda: _arrived(slow_receiver, 1), "the first daemon's callback")
    assert await redis.lrange(K.callbacks("default"), 0, -1) == [job["id"].encode()]
    slow_receiver.gate.set()
    async with running_daemon(config) as second:
        await wait_until(lambda: _sent(base_url(second), 1), "the second daemon's callback")
    # The first daemon's request may be answered too, once the gate opens: at least once.
    assert job["id"] in slow_receiver.answered
    assert await redis.hget(K.totals("default"), "callbacks_sent") == b"1"


async def _arrived(receiver: SlowReceiver, count: int) -> bool:
    return receiver.arrived == count


async def test_a_callback_in_flight_when_its_daemon_is_killed_is_sent_by_another(
    redis_url: str, slow_receiver: SlowReceiver, redis: Redis, tmp_path: Path, free_port: Any
) -> None:
    port = free_port()
    workers = {"heartbeat_interval": 0.2, "dead_after": 1.5}
    config = write_daemon_config(
        tmp_path / "taskd.toml",
        port,
        workers=workers,
        callbacks={"allow": ["127.0.0.0/8"]},
        handlers={"echo": {"builtin": "echo"}},
    )
    env = {"TASKD_REDIS_URL": redis_url, "PYTHONPATH": str(REPO)}
    doomed = DaemonProcess(["--config", str(config)], cwd=tmp_path, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, doomed)
        job = await submit(url, {"type": "echo", "callback_url": slow_receiver.url})
        await wait_until(lambda: _arrived(slow_receiver, 1), "the doomed daemon's callback")
    finally:
        doomed.kill()
    slow_receiver.gate.set()
    async with running_daemon(make_config(redis_url, workers=workers)) as survivor:
        await wait_until(lambda: _sent(base_url(survivor), 1), "the survivor's callback")
    assert job["id"] in slow_receiver.answered
    assert await redis.hget(K.totals("default"), "recovered") is None  # the job had ended
