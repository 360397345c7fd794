"""Crash safety with real processes: SIGKILLed daemons, SIGTERM under load, Redis restarts."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from redis.asyncio import Redis

from taskd.embedded import RedisServer
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import UNAVAILABLE, Keys, Store
from tests.builders import write_daemon_config
from tests.support import REPO, DaemonProcess, get_json, ready_ids, wait_healthy, wait_until

K = Keys("taskd")
Q = "default"


def write_config(
    tmp_path: Path, name: str, port: int, *, concurrency: int, **workers: float
) -> Path:
    settings = {"concurrency": concurrency, "heartbeat_interval": 0.2, "dead_after": 1.5, **workers}
    record = {"python": "tests.handler_funcs:record", "max_attempts": 25}
    return write_daemon_config(
        tmp_path / f"{name}.toml", port, workers=settings, handlers={"record": record}
    )


class Cluster:
    """Daemon processes on one Redis, each recording the jobs it starts in its own file."""

    def __init__(self, tmp_path: Path, redis_url: str, free_port: Any, **settings: Any) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.free_port = free_port
        self.settings = settings
        self.daemons: dict[str, DaemonProcess] = {}
        self.urls: dict[str, str] = {}
        self.starts = 0

    async def start(self, name: str) -> None:
        port = self.free_port()
        config = write_config(self.tmp_path, name, port, **self.settings)
        self.starts += 1
        env = {
            "TASKD_REDIS_URL": self.redis_url,
            "TASKD_TEST_RECORD": str(self.tmp_path / f"record-{self.starts}.txt"),
            "PYTHONPATH": str(REPO),
        }
        self.daemons[name] = DaemonProcess(["--config", str(config)], cwd=self.tmp_path, env=env)
        self.urls[name] = f"http://127.0.0.1:{port}"
        await wait_healthy(self.urls[name], self.daemons[name])

    async def daemon_id(self, name: str) -> str:
        """The id the daemon `name` registered under (found by its pid in /stats)."""
        pid = self.daemons[name].proc.pid
        _, stats = await _stats(self.urls[name])
        [daemon_id] = [d["id"] for d in stats["instances"] if d["pid"] == pid]
        return str(daemon_id)

    def executions(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for record in self.tmp_path.glob("record-*.txt"):
            # Only whole lines: a SIGKILL can cut a write where it crosses a page of the
            # file (Linux checks for a fatal signal between pages), leaving part of an id
            # with no newline at the end. That attempt never ended, and runs again.
            *lines, _torn = record.read_text().split("\n")
            counts.update(lines)
        return counts

    def stop_all(self) -> None:
        for daemon in self.daemons.values():
            daemon.kill()


async def enqueue(redis_url: str, count: int, seconds: float) -> list[str]:
    """`count` jobs of `seconds` each, all ready at once (one script call)."""
    store = Store.from_url(redis_url, prefix="taskd")
    try:
        jobs = [
            Job(new_id(), "record", Q, seconds, QUEUED, 0, now_ms(), max_attempts=25)
            for _ in range(count)
        ]
        await store.enqueue_many(jobs)
        return [job.id for job in jobs]
    finally:
        await store.close()


async def completed(redis: Redis) -> int:
    return int(await redis.zcard(K.completed(Q)))


@pytest.mark.parametrize(
    ("concurrency", "per_kill", "kills", "seconds", "daemons"),
    [
        # Each round brings its own jobs: on a loaded machine b and c could otherwise
        # finish every job while "a" restarts, and there would be nothing left to kill.
        # All at once, and long enough (0.2 s each: a round is over 2 s of work for the
        # three daemons) that a test starved of the CPU for a while on a loaded machine
        # still sees "a" running some: sent one at a time, 0.05 s each, the daemons ran
        # them as fast as they came, and a round could end unseen.
        pytest.param(20, 750, 4, 0.2, ("a", "b", "c"), id="three-daemons"),
        # Short jobs and 64 slots: each drain splits its slots in two halves, each acked
        # (and its slots claimed again) while the other's jobs run (taskd.acker, LANES). A
        # kill then leaves two calls' worth of jobs behind, and the bound on them holds.
        pytest.param(64, 20_000, 3, 0.0, ("a",), id="two-acks-on-the-wire"),
    ],
)
async def test_sigkill_chaos_loses_nothing(
    tmp_path: Path,
    redis_url: str,
    redis: Redis,
    free_port: Any,
    concurrency: int,
    per_kill: int,
    kills: int,
    seconds: float,
    daemons: tuple[str, ...],
) -> None:
    total = per_kill * kills
    cluster = Cluster(tmp_path, redis_url, free_port, concurrency=concurrency)
    ids: list[str] = []
    try:
        for name in daemons:
            await cluster.start(name)
        for _ in range(kills):
            ids += await enqueue(redis_url, per_kill, seconds=seconds)
            # Kill only once the daemon runs jobs, so that every kill leaves some behind.
            victim = await cluster.daemon_id("a")
            await wait_until(lambda v=victim: _running(redis, v), f"{victim} to run jobs")
            cluster.daemons["a"].proc.send_signal(signal.SIGKILL)
            cluster.daemons["a"].kill()
            await cluster.start("a")
        await wait_until(lambda: _at_least(redis, total), "every job completed", deadline=120)
    finally:
        cluster.stop_all()
    # Every job completed, none is left anywhere else, and each ran at least once.
    assert await completed(redis) == total
    assert len(await ready_ids(redis, Q)) == 0
    assert await redis.zcard(K.failed(Q)) == 0
    runs = cluster.executions()
    assert set(runs) == set(ids)
    # Only jobs in flight at a kill may run twice: a daemon never holds more jobs in Redis
    # than slots, so at most `concurrency` per kill.
    recovered = int(await redis.hget(K.totals(Q), "recovered") or 0)
    duplicates = sum(runs.values()) - total
    assert kills <= recovered <= kills * concurrency
    assert duplicates <= recovered, (duplicates, recovered)


async def test_sigterm_under_load_requeues_and_exits_in_time(
    tmp_path: Path, redis_url: str, redis: Redis, free_port: Any
) -> None:
    cluster = Cluster(tmp_path, redis_url, free_port, concurrency=10, shutdown_timeout=1)
    try:
        await cluster.start("a")
        ids = await enqueue(redis_url, 30, seconds=30)

        async def busy() -> bool:
            _, stats = await _stats(cluster.urls["a"])
            return bool(stats["queues"][Q]["active"] == 10)

        await wait_until(busy, "10 jobs running")
        daemon = cluster.daemons["a"]
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.output()
        # The drain deadline plus process exit; generous for a loaded machine.
        assert time.monotonic() - started < 1 + 5
    finally:
        cluster.stop_all()
    assert sorted(await ready_ids(redis, Q)) == sorted(i.encode() for i in ids)
    states = {await redis.hget(K.job(Q, i), "state") for i in ids}
    assert states == {b"queued"}
    assert await redis.zcard(K.daemons) == 0


@pytest.mark.parametrize(
    ("concurrency", "total", "seconds"),
    [
        (10, 400, 0.01),
        # Short jobs and 64 slots: the drain keeps two acks on the wire (taskd.acker), and
        # the outage fails both lanes' calls.
        (64, 60_000, 0.0),
    ],
)
async def test_redis_restart_under_load(
    tmp_path: Path, free_port: Any, concurrency: int, total: int, seconds: float
) -> None:
    server = RedisServer.start_on_free_port(data_dir=tmp_path / "redis", appendonly=True)
    cluster = Cluster(tmp_path, server.url, free_port, concurrency=concurrency, dead_after=5)
    redis = Redis.from_url(server.url)
    try:
        for name in ("a", "b"):
            await cluster.start(name)
        await enqueue(server.url, total, seconds=seconds)
        await wait_until(lambda: _at_least(redis, total // 8), f"{total // 8} jobs completed")
        assert await completed(redis) < total  # the restart comes mid-drain

        server.stop()  # SIGTERM: Redis writes its AOF and exits
        status, health = await _health(cluster.urls["a"])
        assert status == 503, health
        server.start()

        await wait_until(lambda: _at_least(redis, total), "every job completed", deadline=90)
        assert await redis.zcard(K.failed(Q)) == 0
        for daemon in cluster.daemons.values():
            assert daemon.proc.poll() is None, daemon.output()

        async def healthy() -> bool:
            # A connection opened before the restart may fail one ping; the next is fresh.
            return (await _health(cluster.urls["b"]))[0] == 200

        await wait_until(healthy, "daemon b's /health to answer 200 again", deadline=20)
    finally:
        cluster.stop_all()
        await redis.aclose()
        server.stop()


async def _running(redis: Redis, daemon_id: str) -> bool:
    return bool(await redis.zcard(K.active(Q, daemon_id)))


async def _at_least(redis: Redis, count: int) -> bool:
    try:
        return await completed(redis) >= count
    except UNAVAILABLE:
        return False


async def _stats(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        return await get_json(session, f"{url}/stats")


async def _health(url: str) -> tuple[int, Any]:
    with anyio.fail_after(10):
        async with aiohttp.ClientSession() as session:
            return await get_json(session, f"{url}/health")
