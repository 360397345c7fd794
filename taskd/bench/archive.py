"""The archive workloads: a drain with the archive on, and the archive's queries at size.

Both need a PostgreSQL server of their own, started from Debian's postgresql package
(taskd.bench.postgres), and the archive extra; they run only when --only names them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import orjson

from taskd.bench.harness import (
    ARCHIVE_DRAIN,
    ARCHIVE_ROWS,
    POLL,
    QUEUE,
    Bench,
    BenchError,
    Spawned,
)
from taskd.bench.postgres import PostgresServer, PostgresServerError
from taskd.bench.report import Figure
from taskd.bench.workloads import span
from taskd.jobs import now_ms

# Each query of the archive's is timed this many times; the median is reported.
QUERY_RUNS = 7
# Rows inserted per statement while filling the table for archive-queries.
FILL_CHUNK = 200_000
DAY_MS = 86_400_000


@asynccontextmanager
async def own_postgres() -> AsyncIterator[PostgresServer]:
    """A throwaway PostgreSQL server with an empty `archive` database; removed after."""
    try:
        server = await anyio.to_thread.run_sync(PostgresServer)
    except PostgresServerError as exc:
        raise BenchError(f"the archive workloads need PostgreSQL: {exc}") from None
    try:
        await anyio.to_thread.run_sync(server.start)
        await anyio.to_thread.run_sync(server.psql, "postgres", "CREATE DATABASE archive")
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_stop, server)


def _stop(server: PostgresServer) -> None:
    try:
        server.stop()
    finally:
        server.remove()


async def archive(bench: Bench) -> list[Figure]:
    """N noop jobs drained by one daemon (100 slots) without, then with, [archive]: the
    drain rate each time, how fast the archive took the jobs in and how far it fell
    behind the drain, and what the jobs cost each process in CPU time; then N more
    drained while PostgreSQL is down, and how fast the archive catches up once it is back."""
    n = bench.scaled(ARCHIVE_DRAIN)
    plain, _, _, _ = await _drain(bench, n, None)
    await bench.reset()
    async with own_postgres() as server:
        rate, cpu, peak, lag = await _drain(bench, n, server)
        await _wait_archived(bench, server, n)
        catch_up = await _catch_up(bench, n, server)
        await _wait_archived(bench, server, 2 * n)
    bench.note(
        "archive: drain rates of the same daemon without and with [archive]; archived is "
        "jobs written to PostgreSQL per second from the drain's start to the last one "
        "written; archive lag is from the drain's last job done to the hand-off empty; "
        "peak backlog is the most jobs waiting in the hand-off while it drained; "
        "the CPU figures are from the drain's start until the hand-off is empty: the "
        "daemon, its archiver process, Redis and PostgreSQL share the machine's cores; "
        "catch-up is how fast the archive wrote a backlog of as many jobs, drained while "
        "PostgreSQL was down, once it was back (from the first row written to the last)."
    )
    return [
        Figure("drain, no archive", "jobs/s", plain),
        Figure("drain, archive on", "jobs/s", rate),
        Figure("drain change", "%", (rate / plain - 1) * 100),
        Figure("archived", "jobs/s", n / (n / rate + lag)),
        Figure("archive lag after drain", "s", lag),
        Figure("peak backlog", "jobs", peak),
        *cpu,
        Figure("catch-up after an outage", "jobs/s", catch_up),
    ]


async def _drain(
    bench: Bench, n: int, server: PostgresServer | None
) -> tuple[float, list[Figure], int, float]:
    """Drain n waiting noop jobs with one daemon, archiving to `server` (None: not):
    jobs/s, the CPU per job of each process while it drained and archived, the peak of
    the hand-off's backlog, and the seconds from the drain's end to the hand-off empty."""
    local = bench.need_local()
    ids = await local.enqueue(n, "noop", None)
    await local.store.pause(QUEUE)
    extra = "" if server is None else f'\n[archive]\nurl = "{server.url_of("archive")}"\n'
    peak = 0
    async with bench.daemons(1, concurrency=100, extra=extra) as [daemon]:
        if server is not None:
            await _archiver_ready(bench)
        before = await _cpu(bench, daemon, server)
        await local.store.resume(QUEUE)
        async with anyio.create_task_group() as tg:
            if server is not None:

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, await _archived_backlog(bench))
                        await anyio.sleep(POLL)

                tg.start_soon(watch)
            await bench.wait_finished(n)
            tg.cancel_scope.cancel()
        drained_at = time.perf_counter()
        if server is not None:
            # The daemon goes on archiving after the drain: keep it until the archive has all.
            await _archived_in_redis(bench)
        lag = time.perf_counter() - drained_at
        rows = await local.records(ids, ("started_at", "finished_at"))
        after = await _cpu(bench, daemon, server)
    used = []
    for name, then in before.items():
        now = after[name]
        if then is not None and now is not None:
            used.append(Figure(f"{name} CPU", "µs/job", (now - then) / n * 1e6))
    return n / span(rows), used, peak, lag


async def _catch_up(bench: Bench, n: int, server: PostgresServer) -> float:
    """Drain n noop jobs with PostgreSQL stopped, so that they wait in the hand-off; start
    it again and return how many jobs a second the archive then wrote, from the first
    written (the archiver retries a second after a failure) to the hand-off empty."""
    local = bench.need_local()
    await local.enqueue(n, "noop", None)
    await local.store.pause(QUEUE)
    extra = f'\n[archive]\nurl = "{server.url_of("archive")}"\n'
    async with bench.daemons(1, concurrency=100, extra=extra) as [_]:
        await _archiver_ready(bench)  # migrated, so that it needs PostgreSQL for nothing else
        await anyio.to_thread.run_sync(server.stop)
        await local.store.resume(QUEUE)
        await bench.wait_finished(2 * n)  # those of the drain before, and these
        backlog = await _archived_backlog(bench)
        await anyio.to_thread.run_sync(server.start)
        up = time.perf_counter()
        while (left := await _archived_backlog(bench)) == backlog:
            if time.perf_counter() - up > 120:
                raise BenchError("the archive wrote nothing within 120 s of PostgreSQL's start")
            await anyio.sleep(POLL / 10)
        started = time.perf_counter()
        await _archived_in_redis(bench, POLL / 10)
        if not left:  # all written between two looks: timed from PostgreSQL's start
            return backlog / (time.perf_counter() - up)
        return left / (time.perf_counter() - started)


async def _archiver_ready(bench: Bench) -> None:
    """Wait until the daemon's archiver process holds the queue: started, imported and
    migrated, so that none of that counts in the drain's figures."""
    deadline = time.monotonic() + 60
    while await bench.need_local().inspector.archiver_of(QUEUE) is None:
        if time.monotonic() > deadline:
            raise BenchError("the daemon's archiver process did not start within 60 s")
        await anyio.sleep(POLL)


async def _cpu(
    bench: Bench, daemon: Spawned, server: PostgresServer | None
) -> dict[str, float | None]:
    """CPU seconds so far of each process a drain with the archive keeps busy."""
    cpu = {"daemon": daemon.cpu_seconds()}
    if server is not None:
        cpu["archiver process"] = daemon.children_cpu_seconds()
        cpu["Redis"] = await bench.need_local().inspector.cpu_seconds()
        cpu["PostgreSQL"] = server.cpu_seconds()
    return cpu


async def _archived_backlog(bench: Bench) -> int:
    backlog = await bench.need_local().inspector.archive_backlog([QUEUE])
    return backlog[QUEUE][0]


async def _archived_in_redis(bench: Bench, poll: float = POLL) -> None:
    deadline = time.monotonic() + 120
    while await _archived_backlog(bench):
        if time.monotonic() > deadline:
            raise BenchError("the archive did not catch up within 120 s")
        await anyio.sleep(poll)


async def _wait_archived(bench: Bench, server: PostgresServer, n: int) -> None:
    count = await anyio.to_thread.run_sync(
        server.psql, "archive", "SELECT count(*) FROM taskd_jobs"
    )
    if int(count) != n:
        raise BenchError(f"the archive holds {count.strip()} jobs of {n}")


async def archive_queries(bench: Bench) -> list[Figure]:
    """The archive's documented queries on a table of N archived jobs (1,000,000 by
    default): the median time of each, in ms, as PostgreSQL runs them (EXPLAIN ANALYZE)."""
    rows = bench.scaled(ARCHIVE_ROWS)
    async with own_postgres() as server:
        await _fill(server, rows)
        figures = []
        for name, query in _queries().items():
            times = [await _time_query(server, query) for _ in range(QUERY_RUNS)]
            figures.append(Figure(name, "ms", statistics.median(times)))
    bench.note(
        f"archive-queries: {rows:,} archived jobs over 30 days, 10 types, 5 queues, 1 in 10 "
        "failed; each query as GET /archive and GET /jobs/ID send it, first page of 50 "
        "(the median of 7 EXPLAIN ANALYZE runs, server time)."
    )
    return figures


async def _fill(server: PostgresServer, rows: int) -> None:
    """Create the schema as taskd does, and fill it with `rows` synthetic archived jobs."""
    # The daemon's own migration code makes the schema: what is measured is what ships.
    from taskd.archive import Archive

    db = Archive(url=server.url_of("archive"), keep_days=0)
    await db.open()
    try:
        await db.migrate()
        now = now_ms()
        await db.ensure_partitions(now - 31 * DAY_MS, now + DAY_MS)
    finally:
        await db.close()
    for start in range(0, rows, FILL_CHUNK):
        stop = min(rows, start + FILL_CHUNK)
        await anyio.to_thread.run_sync(server.psql, "archive", _fill_sql(start, stop, rows))
    await anyio.to_thread.run_sync(server.psql, "archive", "VACUUM ANALYZE taskd_jobs")


def _fill_sql(start: int, stop: int, rows: int) -> str:
    # Spread evenly over the last 30 days; ids sort as the times do, as UUIDv7s would.
    return f"""
    INSERT INTO taskd_jobs (id, attempts, finished_at, queue, type, state, payload, result,
        error, priority, max_attempts, created_at, started_at, daemon, history)
    SELECT lpad(to_hex(g), 12, '0') || '-7000-8000-000000000000', 1,
        now() - interval '30 days' * (1 - g::float8 / {rows}),
        'q' || (g % 5), 'type' || (g % 10),
        CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'completed' END,
        jsonb_build_object('user', g % 100000, 'order', g, 'region', 'r' || (g % 20)),
        '{{"ok": true}}'::jsonb,
        CASE WHEN g % 10 = 0 THEN 'boom' END,
        5, 3,
        now() - interval '30 days' * (1 - g::float8 / {rows}) - interval '1 second',
        now() - interval '30 days' * (1 - g::float8 / {rows}) - interval '10 ms',
        'bench', '[]'::jsonb
    FROM generate_series({start}, {stop - 1}) AS g
    """


def _queries() -> dict[str, str]:
    """Each documented query, as taskd.archive.db sends it, with realistic values."""
    columns = "*"
    newest = "ORDER BY finished_at DESC, id DESC LIMIT 51"
    return {
        "newest first": f"SELECT {columns} FROM taskd_jobs {newest}",
        "by type": f"SELECT {columns} FROM taskd_jobs WHERE type = 'type3' {newest}",
        "by queue": f"SELECT {columns} FROM taskd_jobs WHERE queue = 'q2' {newest}",
        "by state (failed)": f"SELECT {columns} FROM taskd_jobs WHERE state = 'failed' {newest}",
        "type and state": (
            f"SELECT {columns} FROM taskd_jobs WHERE type = 'type3' AND state = 'completed' "
            f"{newest}"
        ),
        "one day (since/until)": (
            f"SELECT {columns} FROM taskd_jobs WHERE finished_at >= now() - interval '10 days'"
            f" AND finished_at < now() - interval '9 days' {newest}"
        ),
        "payload contains (1 user of 100,000)": (
            f"SELECT {columns} FROM taskd_jobs WHERE payload @> '{{\"user\": 4242}}' {newest}"
        ),
        "payload contains (1 region of 20)": (
            f'SELECT {columns} FROM taskd_jobs WHERE payload @> \'{{"region": "r7"}}\' {newest}'
        ),
        "next page (cursor)": (
            f"SELECT {columns} FROM taskd_jobs WHERE (finished_at, id) < "
            f"(now() - interval '15 days', 'z') {newest}"
        ),
        "one job (GET /jobs/ID)": (
            "SELECT * FROM taskd_jobs WHERE id = '0000000f4240-7000-8000-000000000000' "
            "ORDER BY finished_at DESC LIMIT 1"
        ),
    }


async def _time_query(server: PostgresServer, query: str) -> float:
    out = await anyio.to_thread.run_sync(
        server.psql, "archive", f"EXPLAIN (ANALYZE, FORMAT JSON) {query}"
    )
    return float(orjson.loads(out)[0]["Execution Time"])
