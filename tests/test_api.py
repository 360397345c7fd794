"""The HTTP API end to end on an in-process daemon: submit, look up, stats, health, bad input."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from taskd.api import errors_as_json, redis_deadline
from taskd.daemon import Daemon
from taskd.embedded import RedisServer
from tests.support import (
    Api,
    base_url,
    get_json,
    indexed_ids,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
    wait_until,
)

PRIORITY_RULE = "'priority' must be an integer from 0 (lowest) to 9 (highest), got"


pytestmark = pytest.mark.daemon_config(server={"max_body": 4096})


async def test_echo_job_completes_with_its_payload_as_result(
    api: Api,
) -> None:
    session, url = api
    status, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": {"x": 1}})
    assert status == 201
    assert job["state"] == "queued"
    assert job["queue"] == "default"
    assert job["id"]

    done = await wait_for_state(session, url, job["id"], {"completed", "failed"})

    assert done["state"] == "completed"
    assert done["result"] == {"x": 1}
    assert done["attempts"] == 1
    assert done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]


async def test_submit_answers_location_of_the_job(api: Api) -> None:
    session, url = api
    async with session.post(f"{url}/jobs", json={"type": "noop"}) as response:
        job = await response.json()
        assert response.headers["Location"] == f"/jobs/{job['id']}"


async def test_failing_handler_marks_the_job_failed_and_keeps_serving(
    api: Api,
) -> None:
    session, url = api
    _, job = await post_json(
        session, f"{url}/jobs", {"type": "fail", "payload": {"message": "boom"}}
    )
    failed = await wait_for_state(session, url, job["id"], {"completed", "failed"})
    assert failed["state"] == "failed"
    assert failed["error"] == "boom"

    _, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": 7})
    done = await wait_for_state(session, url, job["id"], {"completed", "failed"})
    assert done["result"] == 7


async def test_job_shows_active_while_it_runs(api: Api) -> None:
    session, url = api
    _, job = await post_json(session, f"{url}/jobs", {"type": "sleep", "payload": {"seconds": 30}})
    active = await wait_for_state(session, url, job["id"], {"active"})
    assert active["started_at"] is not None
    assert active["finished_at"] is None


async def test_submissions_at_once_are_each_answered_as_stored(api: Api) -> None:
    # Arriving together, they share script calls (Store.enqueue): each answer is still its
    # own job, exactly as it was stored.
    session, url = api
    bodies = [{"type": "echo", "payload": n, "delay": 60, "priority": n % 10} for n in range(30)]
    answers = await asyncio.gather(*(post_json(session, f"{url}/jobs", b) for b in bodies))
    assert [status for status, _ in answers] == [201] * len(bodies)
    assert [job["payload"] for _, job in answers] == list(range(len(bodies)))
    for _, job in answers:
        assert await get_json(session, f"{url}/jobs/{job['id']}") == (200, job)


async def test_ids_are_time_ordered(api: Api) -> None:
    session, url = api
    ids = [(await post_json(session, f"{url}/jobs", {"type": "noop"}))[1]["id"] for _ in range(20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20


async def test_stats_count_states_and_list_this_daemon(daemon: Daemon, api: Api) -> None:
    session, url = api
    _, ok = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": 1})
    _, bad = await post_json(session, f"{url}/jobs", {"type": "fail", "max_attempts": 1})
    _, slow = await post_json(session, f"{url}/jobs", {"type": "sleep", "payload": {"seconds": 30}})
    await wait_for_state(session, url, ok["id"], {"completed"})
    await wait_for_state(session, url, bad["id"], {"failed"})
    await wait_for_state(session, url, slow["id"], {"active"})

    status, stats = await get_json(session, f"{url}/stats")

    assert status == 200
    default = stats["queues"]["default"]
    assert {state: default[state] for state in ("queued", "active", "completed", "failed")} == {
        "queued": 0, "active": 1, "completed": 1, "failed": 1,
    }  # fmt: skip
    assert default["totals"] == {
        "enqueued": 3, "completed": 1, "retried": 0, "failed": 1, "cancelled": 0,
        "recovered": 0, "callbacks_sent": 0, "callbacks_failed": 0, "rate_limited": 0,
        "concurrency_limited": 0,
    }  # fmt: skip
    assert default["no_handler"] == {}
    [me] = stats["instances"]
    assert me["id"] == daemon.identity.id
    assert me["pid"] == daemon.identity.pid
    assert me["host"] == daemon.identity.host
    assert me["concurrency"] == 10
    assert me["queues"] == ["default"]
    assert me["types"] == ["echo", "fail", "noop", "sleep"]
    assert me["active"] == 1  # the sleeping job, now: not as of the last heartbeat


async def test_health_is_ok_while_redis_answers(api: Api) -> None:
    session, url = api
    assert await get_json(session, f"{url}/health") == (200, {"status": "ok"})


async def test_unknown_job_id_is_404(api: Api) -> None:
    session, url = api
    status, body = await get_json(session, f"{url}/jobs/nope")
    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert "nope" in body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", 422, "invalid_job", "must be a JSON object"),
        (b"{}", 422, "invalid_job", "missing field 'type'"),
        (b'{"type": 5}', 422, "invalid_job", "'type' must be a string, got number"),
        (b'{"type": null}', 422, "invalid_job", "missing field 'type'"),
        (b'{"type": "resize"}', 422, "unknown_type", "unknown job type 'resize'"),
        (b'{"type": "echo", "paylod": 1}', 422, "invalid_job", "unknown field(s) paylod"),
        (b'{"type": "echo", "delay": -1}', 422, "invalid_job", "'delay' must be a number"),
        (b'{"type": "echo", "delay": 1e9}', 422, "invalid_job", "'delay' must be a number"),
        (b'{"type": "echo", "delay": "5"}', 422, "invalid_job", "'delay' must be a number"),
        (b'{"type": "echo", "delay": true}', 422, "invalid_job", "'delay' must be a number"),
        (b'{"type": "echo", "delay": 1, "run_at": 5}', 422, "invalid_job", "not both"),
        (b'{"type": "echo", "run_at": "tomorrow"}', 422, "invalid_job", "not an RFC 3339 time"),
        (b'{"type": "echo", "run_at": "2030-01-01T00:00:00"}', 422, "invalid_job", "UTC offset"),
        (b'{"type": "echo", "run_at": "2999-01-01T00:00:00Z"}', 422, "invalid_job", "ahead"),
        (b'{"type": "echo", "run_at": -5}', 422, "invalid_job", "out of range"),
        (b'{"type": "echo", "run_at": [1]}', 422, "invalid_job", "got array"),
        (b'{"type": "echo", "max_attempts": 0}', 422, "invalid_job", "'max_attempts' must be"),
        (b'{"type": "echo", "max_attempts": 2.5}', 422, "invalid_job", "'max_attempts' must be"),
        (b'{"type": "echo", "priority": 12}', 422, "invalid_job", f"{PRIORITY_RULE} 12"),
        (b'{"type": "echo", "priority": 10}', 422, "invalid_job", f"{PRIORITY_RULE} 10"),
        (b'{"type": "echo", "priority": -1}', 422, "invalid_job", f"{PRIORITY_RULE} -1"),
        (b'{"type": "echo", "priority": 5.0}', 422, "invalid_job", f"{PRIORITY_RULE} 5.0"),
        (b'{"type": "echo", "priority": true}', 422, "invalid_job", f"{PRIORITY_RULE} True"),
        (b'{"type": "echo", "priority": "9"}', 422, "invalid_job", f"{PRIORITY_RULE} '9'"),
        (b'{"type": "echo", "prio": 9}', 422, "invalid_job", "callback_url, priority"),
        (b'{"type": "echo", "payload": NaN}', 400, "invalid_json", "not valid JSON"),
        (
            b'{"type": "echo", "payload": ' + b"[" * 65 + b"]" * 65 + b"}",
            422,
            "invalid_job",
            "nests deeper than 64 levels",
        ),
        (
            b'{"type": "echo", "payload": {"a": ' + b"[" * 300 + b"]" * 300 + b"}}",
            422,
            "invalid_job",
            "nests deeper than 64 levels",
        ),
        (
            b'{"type": "echo", "payload": 18446744073709551616}',
            422,
            "invalid_job",
            "the integer 18446744073709551616 is outside the 64-bit range",
        ),
        (
            b'{"type": "echo", "payload": [-9223372036854775809]}',
            422,
            "invalid_job",
            "the integer -9223372036854775809 is outside the 64-bit range",
        ),
        (b'{"type": "echo", "run_at": "2030-01-01 00:00:00Z"}', 422, "invalid_job", "RFC 3339"),
        (b'{"type": "echo", "run_at": "20300101T000000Z"}', 422, "invalid_job", "RFC 3339"),
        (b'{"type": "echo", "run_at": "2030-01-01T00:00:00+0100"}', 422, "invalid_job", "RFC 3339"),
        (
            b'{"type": "echo", "run_at": "2030-02-30T00:00:00Z"}',
            422,
            "invalid_job",
            "not a valid time",
        ),
    ],
)
async def test_bad_submissions_get_a_json_error(
    api: Api, body: bytes, status: int, code: str, message: str
) -> None:
    session, url = api
    headers = {"content-type": "application/json"}
    async with session.post(f"{url}/jobs", data=body, headers=headers) as response:
        answer: dict[str, Any] = await response.json()
        assert response.status == status
    assert answer["error"]["code"] == code
    assert message in answer["error"]["message"]


@pytest.mark.parametrize("priority", [0, 9, None])
async def test_a_valid_priority_is_accepted(api: Api, priority: int | None) -> None:
    session, url = api
    status, _ = await post_json(session, f"{url}/jobs", {"type": "noop", "priority": priority})
    assert status == 201


async def test_unknown_type_message_lists_the_configured_types(
    api: Api,
) -> None:
    session, url = api
    _, answer = await post_json(session, f"{url}/jobs", {"type": "resize"})
    assert "echo, fail, noop, sleep" in answer["error"]["message"]


async def test_body_over_the_limit_is_413(api: Api) -> None:
    session, url = api
    status, answer = await post_json(
        session, f"{url}/jobs", {"type": "echo", "payload": "x" * 5000}
    )
    assert status == 413
    assert answer["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nowhere", 404, "not_found"), ("DELETE", "/stats", 405, "method_not_allowed")],
)
async def test_routing_errors_are_json(
    api: Api, method: str, path: str, status: int, code: str
) -> None:
    session, url = api
    async with session.request(method, f"{url}{path}") as response:
        assert response.status == status
        assert (await response.json())["error"]["code"] == code


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("DELETE", "/health", {"GET", "HEAD"}), ("PUT", "/jobs", {"GET", "HEAD", "POST"})],
)
async def test_a_method_an_endpoint_does_not_take_is_405_saying_which_it_does(
    api: Api, method: str, path: str, allowed: set[str]
) -> None:
    # RFC 9110: a 405 must carry Allow. The JSON error body once replaced aiohttp's
    # answer without it (found by the schemathesis run, test_fuzz).
    session, url = api
    async with session.request(method, f"{url}{path}") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == allowed


async def test_daemon_keeps_serving_after_bad_input(api: Api) -> None:
    session, url = api
    for _ in range(3):
        headers = {"Content-Type": "application/json"}
        async with session.post(f"{url}/jobs", data=b"{oops", headers=headers) as response:
            assert response.status == 400
    status, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": "still here"})
    assert status == 201
    done = await wait_for_state(session, url, job["id"], {"completed"})
    assert done["result"] == "still here"


async def test_submissions_are_refused_once_stopping(daemon: Daemon, api: Api) -> None:
    session, url = api
    daemon.api.refuse_new()
    status, answer = await post_json(session, f"{url}/jobs", {"type": "noop"})
    assert status == 503
    assert answer["error"]["code"] == "shutting_down"
    status, health = await get_json(session, f"{url}/health")
    assert status == 503
    assert health["status"] == "stopping"


async def test_health_reports_an_unreachable_redis_and_recovers(tmp_path: Path) -> None:
    server = RedisServer.start_on_free_port(data_dir=tmp_path)
    try:
        async with (
            running_daemon(make_config(server.url)) as daemon,
            aiohttp.ClientSession() as session,
        ):
            url = base_url(daemon)
            server.kill()

            async def unhealthy() -> bool:
                status, body = await get_json(session, f"{url}/health")
                return status == 503 and "Redis does not answer" in body["reason"]

            await wait_until(unhealthy, "/health to report the outage")
            status, answer = await post_json(session, f"{url}/jobs", {"type": "noop"})
            assert (status, answer["error"]["code"]) == (503, "unavailable")

            server.start()

            async def healthy() -> bool:
                return (await get_json(session, f"{url}/health"))[0] == 200

            await wait_until(healthy, "/health to recover")
            _, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": 2})
            assert (await wait_for_state(session, url, job["id"], {"completed"}))["result"] == 2
    finally:
        server.stop()


async def test_batch_enqueues_all_and_answers_ids_in_order(api: Api, redis: Redis) -> None:
    session, url = api
    jobs = [{"type": "echo", "payload": n} for n in range(50)] + [{"type": "noop", "delay": 60}]
    status, body = await post_json(session, f"{url}/jobs/batch", {"jobs": jobs})
    assert status == 201
    assert len(body["ids"]) == 51
    assert body["ids"] == sorted(body["ids"])  # time-ordered ids, in submission order
    for n, job_id in enumerate(body["ids"][:50]):
        done = await wait_for_state(session, url, job_id, {"completed"})
        assert done["result"] == n
    _, last = await get_json(session, f"{url}/jobs/{body['ids'][50]}")
    assert last["state"] == "scheduled"


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([{"type": "echo"}, {"type": "nope"}], "jobs[1]: unknown job type 'nope'"),
        ([{"type": "echo"}, {"type": "echo", "delay": -1}], "jobs[1]: 'delay' must be"),
        ([{"type": "echo"}, 7], "jobs[1]: must be a JSON object, got number"),
        ([{"type": "echo"}, {"type": "echo", "priority": 10}], f"jobs[1]: {PRIORITY_RULE} 10"),
        (
            [{"type": "echo"}, {"type": "echo", "callback_url": "http://169.254.169.254/"}],
            "jobs[1]: 'callback_url' refused: destination 169.254.169.254 refused by "
            "[callbacks] allow/deny",
        ),
        ([], "a batch holds 1 to 3 jobs"),
        ([{"type": "echo"}] * 4, "a batch holds 1 to 3 jobs ([server] max_batch), got 4"),
    ],
)
async def test_a_bad_batch_is_refused_whole(
    redis_url: str, redis: Redis, jobs: list[Any], message: str
) -> None:
    config = make_config(redis_url, server={"max_batch": 3})
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        status, body = await post_json(session, f"{base_url(daemon)}/jobs/batch", {"jobs": jobs})
    assert status == 422
    assert body["error"]["code"] == (
        "unknown_type" if "unknown job type" in message else "invalid_job"
    )
    assert message in body["error"]["message"]
    assert len(await indexed_ids(redis, "default")) == 0  # nothing was enqueued


async def test_each_request_gets_its_own_deadline(free_port: Any) -> None:
    # One timer serves every request's deadline (taskd.timeouts.Timeouts): a request that began
    # later is not cut off at an earlier one's deadline, and a quick one is left alone.
    deadline = 0.3
    entered = asyncio.Event()

    async def hangs(request: web.Request) -> web.Response:
        entered.set()
        await asyncio.Event().wait()  # as a request whose Redis never answers
        raise AssertionError("unreachable")

    async def quick(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[errors_as_json, redis_deadline(deadline)])
    app.router.add_get("/hangs", hangs)
    app.router.add_get("/quick", quick)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def timed(session: aiohttp.ClientSession, path: str) -> tuple[int, Any, float]:
        started = time.monotonic()
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.json(), time.monotonic() - started

    try:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(timed(session, "/hangs"))
            await entered.wait()
            began = time.monotonic()

            async def halfway() -> bool:
                return time.monotonic() - began >= deadline / 2

            await wait_until(halfway, "half the deadline to pass")
            second = asyncio.create_task(timed(session, "/hangs"))
            assert (await timed(session, "/quick"))[:2] == (200, {"ok": True})
            for status, body, took in await asyncio.gather(first, second):
                assert (status, body["error"]["code"]) == (503, "unavailable"), body
                assert "request_timeout" in body["error"]["message"]
                assert deadline <= took < deadline + 5, took
    finally:
        await runner.cleanup()
