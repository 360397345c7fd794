"""Progress reports from Python handlers, shown by GET /jobs/ID while the job runs."""

from __future__ import annotations

from typing import Any

import aiohttp
import anyio
import pytest

from taskd.config import Config
from taskd.jobs import now_ms
from taskd.progress import report_progress
from taskd.store import Store
from tests import handler_funcs
from tests.support import (
    DEADLINE,
    base_url,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
    wait_until,
)


async def test_a_handler_reports_progress_while_it_runs(redis_url: str) -> None:
    handler_funcs.PROGRESS_GATE = handler_funcs.Gauge()
    handlers = {"long": {"python": "tests.handler_funcs:progressing"}}
    async with (
        running_daemon(make_config(redis_url, handlers=handlers)) as daemon,
        aiohttp.ClientSession() as session,
    ):
        url = base_url(daemon)
        _, job = await post_json(session, f"{url}/jobs", {"type": "long"})
        seen: dict[str, object] = {}

        async def reported() -> bool:
            nonlocal seen
            _, seen = await get_json(session, f"{url}/jobs/{job['id']}")
            return seen["progress"] is not None

        await wait_until(reported, "the first progress report")
        assert seen["state"] == "active"
        progress = seen["progress"]
        assert isinstance(progress, dict)
        assert (progress["value"], progress["message"]) == (50.0, "halfway there")

        handler_funcs.PROGRESS_GATE.gate.set()

        async def finished() -> bool:
            nonlocal seen
            _, seen = await get_json(session, f"{url}/jobs/{job['id']}")
            return seen["state"] == "completed"

        await wait_until(finished, "the job to complete")
    assert seen["progress"]["value"] == 100.0  # type: ignore[index]
    assert seen["result"] == "finished"


async def test_progress_outside_a_job_does_nothing_and_bad_values_are_refused() -> None:
    await report_progress(10, "nobody listens")
    with pytest.raises(ValueError, match="finite number"):
        await report_progress(float("nan"))


def one_slot(redis_url: str) -> Config:
    """One job at a time, of the `stepped` handler: a busy daemon claims nothing more."""
    handlers = {"steps": {"python": "tests.handler_funcs:stepped"}}
    return make_config(redis_url, handlers=handlers, workers={"concurrency": 1})


async def submit_steps(session: aiohttp.ClientSession, url: str) -> str:
    status, job = await post_json(session, f"{url}/jobs", {"type": "steps"})
    assert status == 201, job
    return str(job["id"])


async def wait_for_progress(
    session: aiohttp.ClientSession, url: str, job_id: str, message: str
) -> dict[str, Any]:
    """Poll GET /jobs/ID on `url` until the job's progress message is `message`."""
    job: dict[str, Any] = {}

    async def shown() -> bool:
        nonlocal job
        _, job = await get_json(session, f"{url}/jobs/{job_id}")
        return (job["progress"] or {}).get("message") == message

    await wait_until(shown, f"progress {message!r} of job {job_id} through {url}")
    return job


async def test_every_daemon_shows_the_progress_of_jobs_running_on_another(redis_url: str) -> None:
    handler_funcs.RUNS.clear()
    config = one_slot(redis_url)
    async with (
        running_daemon(config) as a,
        running_daemon(config) as b,
        aiohttp.ClientSession() as session,
    ):
        urls = [base_url(a), base_url(b)]
        ids = [await submit_steps(session, urls[0]) for _ in range(2)]
        # One slot each and two jobs running at once: one runs on A, the other on B.
        await wait_until(lambda: _runs(2), "both jobs to start")
        for number, run in enumerate(handler_funcs.RUNS):
            for url in urls:
                job = await wait_for_progress(session, url, run.job_id, f"run {number} started")
                assert (job["state"], job["progress"]["value"]) == ("active", number)
            run.go.set()
        done = [await wait_for_state(session, urls[1], job_id, {"completed"}) for job_id in ids]
    assert {job["history"][0]["daemon"] for job in done} == {a.identity.id, b.identity.id}
    for job in done:
        assert job["progress"]["message"] == f"run {job['result']} finishing"


async def _runs(count: int) -> bool:
    return len(handler_funcs.RUNS) == count


async def test_a_stale_attempt_on_another_daemon_cannot_overwrite_progress(
    redis_url: str, store: Store
) -> None:
    """A job taken back from daemon A while it runs is run again by B; A's late report loses.

    The test takes the job out of A's active set itself (the requeue script), standing in
    for a reaper that took A for dead without waiting out dead_after: A's handler keeps
    running, unaware, and reports after B's attempt did.
    """
    handler_funcs.RUNS.clear()
    config = one_slot(redis_url)
    async with running_daemon(config) as a, aiohttp.ClientSession() as session:
        job_id = await submit_steps(session, base_url(a))
        await wait_for_progress(session, base_url(a), job_id, "run 0 started")
        async with running_daemon(config) as b:
            # A's one slot stays busy with the stale run, so B runs the job again.
            assert await store.requeue("default", a.identity.id, [job_id], now_ms()) == 1
            await wait_for_progress(session, base_url(a), job_id, "run 1 started")
            stale, fresh = handler_funcs.RUNS
            stale.go.set()
            with anyio.fail_after(DEADLINE):
                await stale.reported.wait()
            _, job = await get_json(session, f"{base_url(b)}/jobs/{job_id}")
            assert job["progress"]["message"] == "run 1 started"
            fresh.go.set()
            job = await wait_for_state(session, base_url(b), job_id, {"completed"})
    assert (job["progress"]["message"], job["result"]) == ("run 1 finishing", 1)
    assert [entry["daemon"] for entry in job["history"]] == [b.identity.id]
