"""Delayed jobs, retries, dead letters, cancelling and listing, through the HTTP API."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support import (
    Api,
    DaemonApi,
    get_json,
    post_json,
    wait_for_state,
    wait_until,
)

FAST_RETRIES = {"backoff_base": 0.05, "backoff_max": 0.2}
# How late a due job may start in these tests. The design bound is 50 ms on an idle
# machine; a loaded 2-core CI machine can stall a process for far longer.
LATE_MARGIN_MS = 500

HANDLERS = {
    "echo": {"builtin": "echo"},
    "sleep": {"builtin": "sleep"},
    "fail": {"builtin": "fail", **FAST_RETRIES},
}
pytestmark = pytest.mark.daemon_config(workers={"concurrency": 4}, handlers=HANDLERS)


async def submit(api: Api, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    session, url = api
    got, job = await post_json(session, f"{url}/jobs", body)
    assert got == status, job
    return job


async def action(api: Api, method: str, path: str) -> tuple[int, Any]:
    session, url = api
    async with session.request(method, f"{url}{path}") as response:
        return response.status, await response.json()


def ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339).timestamp() * 1000)


async def test_delayed_jobs_start_on_time_never_early(api: Api) -> None:
    soon = (datetime.now(UTC) + timedelta(milliseconds=400)).isoformat()
    epoch = time.time() + 0.5
    jobs = [
        await submit(api, {"type": "echo", "delay": 0.3}),
        await submit(api, {"type": "echo", "run_at": soon}),
        await submit(api, {"type": "echo", "run_at": epoch}),
    ]
    for job in jobs:
        assert job["state"] == "scheduled"
        assert job["run_at"] is not None
    for job in jobs:
        done = await wait_for_state(api[0], api[1], job["id"], {"completed"})
        late = ms(done["started_at"]) - ms(job["run_at"])
        assert 0 <= late < LATE_MARGIN_MS, late


async def test_run_at_in_the_past_runs_now(api: Api) -> None:
    job = await submit(api, {"type": "echo", "run_at": "2001-01-01T00:00:00Z", "payload": 1})
    assert job["state"] == "queued"
    assert job["run_at"] is None
    assert (await wait_for_state(*api, job["id"], {"completed"}))["result"] == 1


async def test_failed_attempts_retry_with_backoff_then_die(api: Api) -> None:
    job = await submit(api, {"type": "fail", "payload": {"message": "flaky"}, "max_attempts": 3})
    dead = await wait_for_state(*api, job["id"], {"failed"})
    assert (dead["attempts"], dead["error"]) == (3, "flaky")
    history = dead["history"]
    assert [(h["attempt"], h["outcome"]) for h in history] == [
        (1, "retry"), (2, "retry"), (3, "failed"),
    ]  # fmt: skip
    # Each wait is at least half its step: base 0.05 s, then 0.1 s.
    gaps = [ms(b["started_at"]) - ms(a["finished_at"]) for a, b in itertools.pairwise(history)]
    assert gaps[0] >= 25
    assert gaps[1] >= 50
    assert all(gap < 200 + LATE_MARGIN_MS for gap in gaps)


async def test_a_waiting_retry_shows_its_attempts_and_next_run(daemon_api: DaemonApi) -> None:
    handlers = {"fail": {"builtin": "fail", "backoff_base": 60, "backoff_max": 60}}
    async with daemon_api(handlers=handlers) as (_, api):
        job = await submit(api, {"type": "fail", "payload": {"message": "later"}})
        waiting = await wait_for_state(*api, job["id"], {"scheduled"})
    assert waiting["attempts"] == 1
    assert waiting["error"] == "later"
    wait = ms(waiting["run_at"]) - ms(waiting["history"][0]["finished_at"])
    assert 30_000 <= wait <= 60_000


async def test_permanent_failure_is_not_retried(api: Api) -> None:
    job = await submit(api, {"type": "fail", "payload": {"message": "bad", "permanent": True}})
    dead = await wait_for_state(*api, job["id"], {"failed"})
    assert dead["attempts"] == 1


async def test_dead_letters_list_retry_and_delete(api: Api) -> None:
    ok = await submit(api, {"type": "echo", "payload": 1})
    bad = await submit(api, {"type": "fail", "max_attempts": 1})
    await wait_for_state(*api, ok["id"], {"completed"})
    await wait_for_state(*api, bad["id"], {"failed"})

    status, dead = await action(api, "GET", "/dead?queue=default")
    assert status == 200
    assert [j["id"] for j in dead["jobs"]] == [bad["id"]]

    status, again = await action(api, "POST", f"/jobs/{bad['id']}/retry")
    assert status == 200
    assert again["state"] != "failed" or len(again["history"]) == 2
    await wait_until(lambda: _failed_twice(api, bad["id"]), "the retried job to run and fail")
    _, retried = await action(api, "GET", f"/jobs/{bad['id']}")
    assert retried["attempts"] == 1  # reset by the retry, then used once
    status, body = await action(api, "POST", f"/jobs/{ok['id']}/retry")
    assert (status, body["error"]["code"]) == (409, "conflict")
    assert "only a failed job can be retried" in body["error"]["message"]

    assert await action(api, "DELETE", f"/jobs/{bad['id']}") == (
        200, {"id": bad["id"], "deleted": True},
    )  # fmt: skip
    status, body = await action(api, "GET", f"/jobs/{bad['id']}")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert (await action(api, "GET", "/dead"))[1]["jobs"] == []


async def test_cancel_in_each_state(api: Api) -> None:
    running = [await submit(api, {"type": "sleep", "payload": {"seconds": 60}}) for _ in range(4)]
    for job in running:
        await wait_for_state(*api, job["id"], {"active"})
    queued = await submit(api, {"type": "echo"})  # every slot is taken: it waits
    scheduled = await submit(api, {"type": "echo", "delay": 60})

    status, body = await action(api, "POST", f"/jobs/{queued['id']}/cancel")
    assert (status, body["state"]) == (200, "cancelled")
    status, body = await action(api, "POST", f"/jobs/{scheduled['id']}/cancel")
    assert (status, body["state"]) == (200, "cancelled")
    status, body = await action(api, "POST", f"/jobs/{running[0]['id']}/cancel")
    assert status == 202
    # Marked for the daemon running it, or already cancelled by it: it is quick.
    assert body["cancel_requested"] or body["state"] == "cancelled"
    stopped = await wait_for_state(*api, running[0]["id"], {"cancelled"})
    assert stopped["history"][-1]["outcome"] == "cancelled"

    # The freed slot runs nothing cancelled: the queue is empty.
    status, stats = await action(api, "GET", "/stats")
    assert stats["queues"]["default"]["queued"] == 0
    assert stats["queues"]["default"]["cancelled"] == 3

    status, body = await action(api, "POST", f"/jobs/{queued['id']}/cancel")
    assert (status, body["error"]["code"]) == (409, "conflict")
    status, body = await action(api, "POST", "/jobs/0190f5c0-0000-7000-8000-000000000000/cancel")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await action(api, "DELETE", f"/jobs/{running[1]['id']}")
    assert (status, body["error"]["code"]) == (409, "conflict")


async def test_listing_pages_and_filters(api: Api) -> None:
    ids = [(await submit(api, {"type": "echo", "payload": n}))["id"] for n in range(5)]
    for job_id in ids:
        await wait_for_state(*api, job_id, {"completed"})
    await submit(api, {"type": "echo", "delay": 60})

    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await action(api, "GET", f"/jobs?state=completed&limit=2{cursor}")
        assert status == 200
        seen += [j["id"] for j in page["jobs"]]
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert sorted(seen) == sorted(ids)

    _, everything = await action(api, "GET", "/jobs?queue=default&type=echo")
    assert len(everything["jobs"]) == 6
    _, scheduled = await action(api, "GET", "/jobs?state=scheduled")
    assert [j["state"] for j in scheduled["jobs"]] == ["scheduled"]
    _, none = await action(api, "GET", "/jobs?type=sleep")
    assert none["jobs"] == []


@pytest.mark.parametrize(
    "query",
    ["state=done", "limit=0", "limit=5000", "limit=x", "cursor=zzz", "colour=red"],
)
async def test_bad_listing_parameters_are_400(api: Api, query: str) -> None:
    status, body = await action(api, "GET", f"/jobs?{query}")
    assert (status, body["error"]["code"]) == (400, "invalid_query")


async def _failed_twice(api: Api, job_id: str) -> bool:
    _, job = await get_json(api[0], f"{api[1]}/jobs/{job_id}")
    return bool(job["state"] == "failed" and len(job["history"]) == 2)
