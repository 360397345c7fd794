"""A fleet of real daemon processes that differ: handler limits, missing handlers, priorities
under a global_concurrency, and what /stats says of them."""

from __future__ import annotations

import itertools
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from redis.asyncio import Redis

from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Keys, Store
from tests.builders import write_daemon_config
from tests.support import (
    DaemonProcess,
    get_json,
    post_json,
    wait_for_state,
    wait_healthy,
    wait_until,
)

K = Keys("taskd")
Q = "default"
SLEEP = {"builtin": "sleep"}


class Fleet:
    """Daemon processes on the test Redis, each with a config of its own."""

    def __init__(self, tmp_path: Path, redis_url: str, free_port: Any) -> None:
        self._tmp = tmp_path
        self._redis_url = redis_url
        self._free_port = free_port
        self.daemons: list[DaemonProcess] = []

    async def start(self, handlers: Mapping[str, Mapping[str, Any]], **workers: Any) -> str:
        """Start a daemon with these handlers and [workers] settings; its base URL."""
        port = self._free_port()
        settings = {"concurrency": 20, "heartbeat_interval": 0.5, "dead_after": 5, **workers}
        config = write_daemon_config(
            self._tmp / f"taskd-{len(self.daemons)}.toml", port, workers=settings, handlers=handlers
        )
        daemon = DaemonProcess(
            ["--config", str(config)], cwd=self._tmp, env={"TASKD_REDIS_URL": self._redis_url}
        )
        self.daemons.append(daemon)
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, daemon)
        return url

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.kill()


@asynccontextmanager
async def fleet(
    tmp_path: Path, redis_url: str, free_port: Any
) -> AsyncIterator[tuple[Fleet, aiohttp.ClientSession]]:
    daemons = Fleet(tmp_path, redis_url, free_port)
    try:
        async with aiohttp.ClientSession() as session:
            yield daemons, session
    finally:
        daemons.stop()


async def submit(session: aiohttp.ClientSession, url: str, body: Mapping[str, Any]) -> str:
    status, job = await post_json(session, f"{url}/jobs", body)
    assert status == 201, job
    return str(job["id"])


async def records(session: aiohttp.ClientSession, url: str, ids: list[str]) -> list[Any]:
    return [(await get_json(session, f"{url}/jobs/{job_id}"))[1] for job_id in ids]


def ms(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp() * 1000


def sleep_job(seconds: float, priority: int = 5, job_type: str = "slow") -> dict[str, Any]:
    return {"type": job_type, "payload": {"seconds": seconds}, "priority": priority}


async def test_handler_concurrency_is_kept_in_the_claim_not_after_it(
    tmp_path: Path, redis_url: str, free_port: Any
) -> None:
    async with fleet(tmp_path, redis_url, free_port) as (daemons, session):
        url = await daemons.start({"slow": {**SLEEP, "concurrency": 1}}, concurrency=20)
        long = await submit(session, url, sleep_job(3))
        await wait_for_state(session, url, long, {"active"})
        short = [await submit(session, url, sleep_job(0.05, priority=1)) for _ in range(3)]
        urgent = await submit(session, url, sleep_job(0.05, priority=9))
        # While the long job runs, the others are not claimed: queued, not "active" in a
        # daemon that cannot start them.
        await anyio.sleep(0.5)
        waiting = await records(session, url, [*short, urgent])
        assert [j["state"] for j in waiting] == ["queued"] * 4
        for job_id in [*short, urgent]:
            await wait_for_state(session, url, job_id, {"completed"})
        ran = await records(session, url, [long, urgent, *short])
    starts = [ms(j["started_at"]) for j in ran]
    assert starts == sorted(starts)  # the priority-9 job first, then the others in order
    for before, after in itertools.pairwise(ran):
        # Each started when its handler did: after the one before it had finished.
        assert ms(after["started_at"]) >= ms(before["finished_at"])


async def test_a_second_daemon_runs_what_the_first_has_no_slot_for(
    tmp_path: Path, redis_url: str, free_port: Any
) -> None:
    async with fleet(tmp_path, redis_url, free_port) as (daemons, session):
        handlers = {"slow": {**SLEEP, "concurrency": 1}}
        urls = [await daemons.start(handlers), await daemons.start(handlers)]
        long = await submit(session, urls[0], sleep_job(4))
        await wait_for_state(session, urls[0], long, {"active"})
        [running] = await records(session, urls[0], [long])
        others = [await submit(session, urls[n % 2], sleep_job(0.1)) for n in range(4)]
        for job_id in others:
            await wait_for_state(session, urls[0], job_id, {"completed"})
        [still] = await records(session, urls[0], [long])
        assert still["state"] == "active"  # they all ran meanwhile...
        ran = await records(session, urls[0], others)
        assert all(j["daemon"] != running["daemon"] for j in ran)  # ...on the other daemon
        assert [j["attempts"] for j in ran] == [1] * 4


async def test_a_rolling_deploy_strands_and_fails_nothing(
    tmp_path: Path, redis_url: str, free_port: Any, redis: Redis
) -> None:
    """An old daemon without the new type `resize` next to a new one that has it."""
    async with fleet(tmp_path, redis_url, free_port) as (daemons, session):
        old = await daemons.start({"echo": {"builtin": "echo"}})
        new = await daemons.start({"echo": {"builtin": "echo"}, "resize": SLEEP})
        status, refused = await post_json(session, f"{old}/jobs", sleep_job(0, job_type="resize"))
        assert (status, refused["error"]["code"]) == (422, "unknown_type")  # as before
        jobs = [sleep_job(0.01, job_type="resize")] * 100
        status, body = await post_json(session, f"{new}/jobs/batch", {"jobs": jobs})
        assert status == 201, body
        echoes = [await submit(session, old, {"type": "echo", "payload": n}) for n in range(20)]

        async def all_done() -> bool:
            return await redis.zcard(K.completed(Q)) == 120

        await wait_until(all_done, "120 jobs completed")
        assert await redis.zcard(K.failed(Q)) == 0
        _, new_stats = await get_json(session, f"{new}/stats")
        new_id_ = next(i["id"] for i in new_stats["instances"] if "resize" in i["types"])
        resized = await records(session, new, body["ids"])
        assert {(j["state"], j["daemon"], j["attempts"]) for j in resized} == {
            ("completed", new_id_, 1)
        }
        assert len(await records(session, old, echoes)) == 20
        assert new_stats["queues"][Q]["no_handler"] == {}


async def test_jobs_no_live_daemon_can_run_wait_and_show_in_stats(
    tmp_path: Path, redis_url: str, free_port: Any
) -> None:
    async with fleet(tmp_path, redis_url, free_port) as (daemons, session):
        old = await daemons.start({"echo": {"builtin": "echo"}})
        # Submitted through a daemon that knows the type, since gone: straight into Redis.
        store = Store.from_url(redis_url, prefix="taskd")
        job = Job(new_id(), "resize", Q, {"seconds": 0}, QUEUED, 0, now_ms())
        try:
            await store.enqueue(job)
        finally:
            await store.close()

        async def stranded() -> bool:
            _, stats = await get_json(session, f"{old}/stats")
            entry = stats["queues"][Q]["no_handler"].get("resize")
            return entry is not None and entry["job"] == job.id and entry["wait_ms"] >= 500

        await wait_until(stranded, "/stats to show the resize job waiting for a handler")
        async with session.get(f"{old}/metrics") as response:
            metrics = await response.text()
        assert 'taskd_jobs_without_handler_wait_seconds{queue="default",type="resize"}' in metrics
        [waiting] = await records(session, old, [job.id])
        assert (waiting["state"], waiting["attempts"]) == ("queued", 0)
        new = await daemons.start({"resize": SLEEP})
        await wait_for_state(session, new, job.id, {"completed"})
        _, stats = await get_json(session, f"{old}/stats")
        assert stats["queues"][Q]["no_handler"] == {}


async def test_priority_order_holds_under_a_global_concurrency_across_daemons(
    tmp_path: Path, redis_url: str, free_port: Any
) -> None:
    async with fleet(tmp_path, redis_url, free_port) as (daemons, session):
        handlers = {"slow": {**SLEEP, "global_concurrency": 1}}
        urls = [await daemons.start(handlers, concurrency=100) for _ in range(2)]
        blocker = await submit(session, urls[0], sleep_job(2))
        await wait_for_state(session, urls[0], blocker, {"active"})
        priorities = [1, 9, 5, 3, 7, 2, 8, 5, 9, 1, 3, 7]
        ids = [
            await submit(session, urls[n % 2], sleep_job(0.05, priority=p))
            for n, p in enumerate(priorities)
        ]
        for job_id in ids:
            await wait_for_state(session, urls[0], job_id, {"completed"})
        jobs = await records(session, urls[0], ids)
    # Highest priority first; within one, oldest first (by the millisecond it became due,
    # then by id).
    expected = sorted(jobs, key=lambda j: (-j["priority"], ms(j["created_at"]), j["id"]))
    started = sorted(jobs, key=lambda j: ms(j["started_at"]))
    assert [j["id"] for j in started] == [j["id"] for j in expected]
    assert len({j["daemon"] for j in jobs}) == 2  # both daemons took part


async def test_stats_tell_live_activity_true_waits_and_every_total(
    tmp_path: Path, redis_url: str, free_port: Any
) -> None:
    async with fleet(tmp_path, redis_url, free_port) as (daemons, session):
        # Heartbeats far apart: what /stats says of activity cannot come from them.
        url = await daemons.start(
            {"slow": SLEEP, "fail": {"builtin": "fail", "max_attempts": 1}},
            heartbeat_interval=30,
            dead_after=90,
        )
        _, stats = await get_json(session, f"{url}/stats")
        assert stats["queues"][Q]["totals"] == dict.fromkeys(
            [
                "enqueued", "completed", "retried", "failed", "cancelled", "recovered",
                "callbacks_sent", "callbacks_failed", "rate_limited", "concurrency_limited",
            ],
            0,
        )  # fmt: skip
        running = [await submit(session, url, sleep_job(1.5)) for _ in range(6)]
        for job_id in running:
            await wait_for_state(session, url, job_id, {"active"})
        _, stats = await get_json(session, f"{url}/stats")
        assert [i["active"] for i in stats["instances"]] == [6]
        for job_id in running:
            await wait_for_state(session, url, job_id, {"completed"})
        _, stats = await get_json(session, f"{url}/stats")
        assert [i["active"] for i in stats["instances"]] == [0]

        # A dead letter retried by hand a while after it failed waits from the retry.
        failed = await submit(session, url, {"type": "fail"})
        await wait_for_state(session, url, failed, {"failed"})
        await anyio.sleep(2)  # time passing is the point here, not a wait for something
        async with session.post(f"{url}/jobs/{failed}/retry") as response:
            assert response.status == 200
        await wait_until(
            lambda: _attempts_at_least(session, url, failed, 1), "the retried job to run again"
        )
        _, stats = await get_json(session, f"{url}/stats")
        assert stats["queues"][Q]["wait_ms"]["p99"] < 1500


async def _attempts_at_least(
    session: aiohttp.ClientSession, url: str, job_id: str, attempts: int
) -> bool:
    _, job = await get_json(session, f"{url}/jobs/{job_id}")
    return bool(job["state"] == "failed" and job["attempts"] >= attempts)


pytestmark = pytest.mark.timeout(120)


async def test_a_daemon_stopped_past_dead_after_does_not_finish_a_job_run_elsewhere(
    tmp_path: Path, redis_url: str, free_port: Any, redis: Redis
) -> None:
    """SIGSTOP for longer than dead_after: the other daemon takes the job back and runs it;
    the stopped one, resumed, records nothing of its stale attempt, and counts it."""
    async with fleet(tmp_path, redis_url, free_port) as (daemons, session):
        handlers = {"slow": {**SLEEP, "max_attempts": 3}}
        timing = {"heartbeat_interval": 0.2, "dead_after": 1.5}
        urls = [await daemons.start(handlers, **timing) for _ in range(2)]
        job_id = await submit(session, urls[0], sleep_job(3))
        first = await wait_for_state(session, urls[0], job_id, {"active"})
        _, stats = await get_json(session, f"{urls[0]}/stats")
        pids = {i["id"]: i["pid"] for i in stats["instances"]}
        stopped = next(d for d in daemons.daemons if d.proc.pid == pids[first["daemon"]])
        other = urls[1] if stopped is daemons.daemons[0] else urls[0]
        stopped.signal(signal.SIGSTOP)
        try:

            async def rerun_elsewhere() -> bool:
                _, job = await get_json(session, f"{other}/jobs/{job_id}")
                return bool(job["state"] == "completed")

            await wait_until(rerun_elsewhere, "the job to complete on the other daemon")
        finally:
            stopped.signal(signal.SIGCONT)
        stopped_url = urls[0] if other == urls[1] else urls[1]

        async def counted() -> bool:
            async with session.get(f"{stopped_url}/metrics") as response:
                text = await response.text()
            return 'taskd_attempts_lost_total{queue="default"} 1.0' in text

        await wait_until(counted, "the stopped daemon to count its lost attempt")
        _, job = await get_json(session, f"{other}/jobs/{job_id}")
    assert (job["state"], job["attempts"]) == ("completed", 2)
    assert job["daemon"] != first["daemon"]
    assert [h["outcome"] for h in job["history"]] == ["lost", "completed"]
