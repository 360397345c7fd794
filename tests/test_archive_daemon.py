"""The archive with real daemons: PostgreSQL stopped under load, a daemon SIGKILLed with jobs
in its hand-off, /stats and /metrics while the archive falls behind, bad [archive] config."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import psycopg
import pytest

from taskd.archive.process import ArchiverProcess, Spec
from taskd.bench.postgres import PostgresServer
from tests.builders import write_daemon_config
from tests.ports import free_port
from tests.support import (
    REPO,
    TASKD,
    DaemonApi,
    DaemonProcess,
    alive,
    get_json,
    post_json,
    wait_healthy,
    wait_until,
)

# Long enough for a loaded 2-core machine to run and archive a few thousand jobs.
DEADLINE = 60.0


async def archived(url: str) -> tuple[int, int]:
    """Rows in the archive, and distinct (job, attempt count, finish) among them."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute(
            "SELECT count(*), count(DISTINCT (id, attempts, finished_at)) FROM taskd_jobs"
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


async def archived_or_zero(url: str) -> int:
    try:
        return (await archived(url))[0]
    except psycopg.Error:
        return 0  # not migrated yet


async def submit(session: aiohttp.ClientSession, base: str, count: int) -> list[str]:
    status, body = await post_json(
        session,
        f"{base}/jobs/batch",
        {"jobs": [{"type": "echo", "payload": n} for n in range(count)]},
    )
    assert status == 201, body
    return list(body["ids"])


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    status, body = await get_json(session, f"{base}/stats")
    assert status == 200
    return body


@pytest.mark.timeout(120)
async def test_a_postgresql_outage_under_load_loses_nothing_and_stops_nothing(
    daemon_api: DaemonApi, own_postgres: PostgresServer
) -> None:
    url = own_postgres.url_of("archive")
    async with daemon_api(archive={"url": url}, workers={"concurrency": 50}) as (_, api):
        session, base = api
        await submit(session, base, 300)
        await wait_until(lambda: _count_is(url, 300), "the first jobs archived", DEADLINE)

        own_postgres.stop()
        for _ in range(4):
            await submit(session, base, 250)

        async def all_completed() -> bool:
            return (await stats(session, base))["queues"]["default"]["completed"] == 1300

        await wait_until(all_completed, "every job to run while PostgreSQL is down", DEADLINE)
        status, health = await get_json(session, f"{base}/health")
        assert (status, health) == (200, {"status": "ok"})
        backlog = (await stats(session, base))["archive"]
        assert backlog["pending"] == 1000
        assert backlog["oldest_age_s"] is not None
        async with session.get(f"{base}/metrics") as response:
            assert "taskd_archive_pending 1000.0" in await response.text()

        own_postgres.start()
        await wait_until(lambda: _count_is(url, 1300), "the backlog archived", DEADLINE)
        assert await archived(url) == (1300, 1300)  # each job once

        async def drained() -> bool:
            return (await stats(session, base))["archive"] == {"pending": 0, "oldest_age_s": None}

        await wait_until(drained, "the hand-off empty", DEADLINE)


async def _count_is(url: str, expected: int) -> bool:
    return await archived_or_zero(url) == expected


@pytest.mark.timeout(120)
async def test_a_daemon_killed_with_jobs_in_its_hand_off_loses_none(
    tmp_path: Path, redis_url: str, own_postgres: PostgresServer
) -> None:
    url = own_postgres.url_of("archive")

    def start() -> tuple[DaemonProcess, str]:
        port = free_port()
        config = write_daemon_config(
            tmp_path / f"taskd-{port}.toml",
            port,
            redis={"url": redis_url},
            workers={"concurrency": 50, "heartbeat_interval": 0.5, "dead_after": 3},
            handlers={"echo": {"builtin": "echo"}},
            archive={"url": url},
        )
        process = DaemonProcess(
            ["--config", str(config)], cwd=tmp_path, env={"PYTHONPATH": str(REPO)}
        )
        return process, f"http://127.0.0.1:{port}"

    first, base = start()
    try:
        await wait_healthy(base, first)
        async with aiohttp.ClientSession() as session:
            await submit(session, base, 500)
            await wait_until(lambda: _count_is(url, 500), "the first jobs archived", DEADLINE)
            # PostgreSQL away: what the daemon ends waits in the hand-off, and it dies so.
            own_postgres.stop()
            for _ in range(4):
                await submit(session, base, 500)

            async def all_completed() -> bool:
                return (await stats(session, base))["queues"]["default"]["completed"] == 2500

            await wait_until(all_completed, "every job completed", DEADLINE)
            assert (await stats(session, base))["archive"]["pending"] == 2000
        archivers = first.children()
        assert len(archivers) == 1, archivers  # its archiver process
        first.signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()

    # Its stdin closed with the daemon: the archiver process does not outlive it.
    await wait_until(lambda: _gone(archivers[0]), "the archiver process to exit", DEADLINE)

    own_postgres.start()
    second, base = start()
    try:
        await wait_healthy(base, second)
        await wait_until(lambda: _count_is(url, 2500), "the dead daemon's backlog", DEADLINE)
        assert await archived(url) == (2500, 2500)
        archivers = second.children()
        assert len(archivers) == 1, archivers
    finally:
        second.signal(signal.SIGTERM)
        assert second.wait() == 0
    # A graceful stop stops it too.
    assert not alive(archivers[0])


async def _gone(pid: int) -> bool:
    return not alive(pid)


@pytest.mark.timeout(120)
async def test_an_archiver_process_that_dies_is_started_again(
    daemon_api: DaemonApi, own_postgres: PostgresServer
) -> None:
    url = own_postgres.url_of("archive")
    async with daemon_api(archive={"url": url}) as (daemon, api):
        session, base = api
        assert daemon.archiver is not None
        await submit(session, base, 100)
        await wait_until(lambda: _count_is(url, 100), "the first jobs archived", DEADLINE)
        first = daemon.archiver.pid
        assert first is not None
        assert alive(first)

        os.kill(first, signal.SIGKILL)

        async def another() -> bool:
            pid = daemon.archiver.pid if daemon.archiver else None
            return pid is not None and pid != first

        await wait_until(another, "a new archiver process", DEADLINE)
        await submit(session, base, 100)
        await wait_until(lambda: _count_is(url, 200), "the next jobs archived", DEADLINE)
        assert await archived(url) == (200, 200)
        pid = daemon.archiver.pid
    assert pid is not None
    assert not alive(pid)


async def test_a_burst_of_ended_jobs_wakes_the_archiver_process_once_an_interval() -> None:
    # The daemon wakes its archiver process for jobs it ended: at once, then at most once
    # an interval however many end meanwhile, and once more for the last of a burst, so
    # that an idle archiver process never waits for its poll.
    interval = 0.3
    spec = Spec(
        redis_url="redis://127.0.0.1:1", prefix="taskd", cluster=False,
        archive_url="postgresql://127.0.0.1:1/archive", keep_days=0, daemon_id="d",
        queues=("default",), log_level="info", log_format="text",
    )  # fmt: skip
    process = ArchiverProcess(spec=spec, wake_interval=interval)
    sender, receiver = anyio.create_memory_object_stream[bytes](10_000)
    wakes: list[float] = []

    async def count() -> None:
        async for _ in receiver:
            wakes.append(time.monotonic())

    async with sender, receiver, anyio.create_task_group() as tg:
        tg.start_soon(process._send_wakes, sender)
        tg.start_soon(count)
        started = time.monotonic()
        while time.monotonic() - started < 2 * interval:
            process.job_ended()
            await anyio.sleep(0.001)
        last = time.monotonic()
        most = (last - started) / interval + 2

        async def done() -> bool:
            return len(wakes) > most or wakes[-1] > last

        await wait_until(done, "a wake after the burst's last job", DEADLINE)
        tg.cancel_scope.cancel()
    assert wakes[0] - started < interval
    assert len(wakes) <= most
    # anyio.sleep may wake a clock tick early.
    assert all(later - earlier > 0.9 * interval for earlier, later in itertools.pairwise(wakes))


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('url = "mysql://db/jobs"', "archive.url: must be a postgresql:// URL"),
        ("keep_days = 7", "archive.url: is required"),
        ('url = "postgresql://db/jobs"\nkeep_days = -1', "archive.keep_days: must be"),
        ('url = "postgresql://db/jobs"\nbatch = 10', "archive.batch: unknown key"),
    ],
)
def test_a_bad_archive_table_stops_start_up_with_its_key_path(
    tmp_path: Path, table: str, expected: str
) -> None:
    config = tmp_path / "taskd.toml"
    config.write_text(f'[handlers.echo]\nbuiltin = "echo"\n\n[archive]\n{table}\n')
    done = subprocess.run(
        [str(TASKD), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 2, done.stdout
    assert str(config) in done.stderr
    assert expected in done.stderr


def test_the_archive_url_password_is_never_shown(tmp_path: Path) -> None:
    config = tmp_path / "taskd.toml"
    config.write_text(
        '[handlers.echo]\nbuiltin = "echo"\n\n[archive]\n'
        'url = "mysql://taskd:s3cret@db/jobs?password=s3cret"\n'
    )
    done = subprocess.run(
        [str(TASKD), "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 2
    assert "archive.url" in done.stderr
    assert "s3cret" not in done.stderr
