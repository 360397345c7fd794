"""The archive on a real Redis and a real PostgreSQL: the hand-off the scripts fill, what the
archiver writes, the janitor's respect for unarchived jobs, the schema's migrations."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest
from redis.asyncio import Redis

from taskd.archive import MIGRATIONS, Archive, Filters
from taskd.archive import db as db_module
from taskd.archive.schema import VERSIONS
from taskd.archiver import ROUNDS, Archiver
from taskd.bench.postgres import PostgresServer
from taskd.embedded import RedisServer
from taskd.jobs import Job
from taskd.store import ArchiveRecord, Keys, Store
from taskd.store import store as store_module
from tests.builders import ended, enqueue, new_job
from tests.support import ECHO, REPO, fill

Q = "default"
ME = "daemon-a"
K = Keys("taskd")
DAY_MS = 86_400_000
NOW = 1_765_000_000_000  # 2025-12-06: any fixed time past the epoch


@pytest.fixture
async def archiving(redis_url: str) -> AsyncIterator[Store]:
    """A store whose scripts hand the jobs they end to the archive."""
    store = Store.from_url(redis_url, prefix="taskd", blocking_connections=2, archive=True)
    yield store
    await store.close()


@asynccontextmanager
async def opened(url: str, keep_days: int = 30) -> AsyncIterator[Archive]:
    """An archive database as a daemon opens it, closed after."""
    db = Archive(url=url, keep_days=keep_days)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def archive(archive_url: str) -> AsyncIterator[Archive]:
    async with opened(archive_url) as db:
        yield db


def archiver(
    store: Store, db: Archive, daemon: str = ME, queues: tuple[str, ...] = (Q,), **options: Any
) -> Archiver:
    return Archiver(
        store=store, archive=db, daemon_id=daemon, queues=queues, clock=lambda: NOW, **options
    )


async def rows(url: str, where: str = "true") -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute(
            f"SELECT id, attempts, state, payload, result, error FROM taskd_jobs WHERE {where}"
            " ORDER BY finished_at, id"
        )
        return await cursor.fetchall()


async def finish(
    store: Store, jobs: list[Job], outcome: str, value: str, at: int, queue: str = Q
) -> None:
    """Claim `jobs` (queued, in this order) and end each attempt with `outcome`."""
    claimed = (await store.claim(queue, ME, len(jobs), now=at, type_limits=ECHO)).jobs
    assert [job.id for job in claimed] == [job.id for job in jobs]
    done = [ended(job, outcome, value, finished_at=at) for job in claimed]
    await store.ack(queue, ME, done, now=at)


async def handed_off(store: Store) -> list[ArchiveRecord]:
    """The records of the jobs in the default queue's hand-off, left there."""
    taken = await store.take_archive(Q, ME, 100, lease_ms=1000)
    assert taken is not None
    return [each.record for each in taken if each.record is not None]


async def ended_in(store: Store, queue: str, count: int) -> list[Job]:
    """`count` jobs of `queue`, completed at NOW."""
    jobs = await enqueue(store, count, queue=queue)
    await finish(store, jobs, "completed", "1", at=NOW, queue=queue)
    return jobs


async def test_every_final_state_is_handed_off_and_archived_once(
    archiving: Store, archive: Archive, archive_url: str, redis: Redis
) -> None:
    done, dead, waiting = await enqueue(archiving, 3)
    await finish(archiving, [done], "completed", '{"r":1}', at=NOW)
    await finish(archiving, [dead], "failed", "boom", at=NOW)
    assert await archiving.cancel(Q, waiting.id, now=NOW + 1) == "queued"
    assert await redis.zcard(K.archive(Q)) == 3
    assert await archiver(archiving, archive).tick() == 3
    assert await redis.zcard(K.archive(Q)) == 0
    found = await rows(archive_url)
    assert [(r[0], r[2]) for r in found] == [
        (done.id, "completed"),
        (dead.id, "failed"),
        (waiting.id, "cancelled"),
    ]
    assert found[0][1:] == (1, "completed", {"n": 0}, {"r": 1}, None)
    assert found[1][1:] == (1, "failed", {"n": 1}, None, "boom")
    # The history as GET /jobs/ID shows it: the final attempt's entry, implied by the
    # record in Redis, is written out.
    [done_job] = (await archive.page(Filters(state="completed"), 1, None)).jobs
    assert done_job.history == (
        {"attempt": 1, "daemon": ME, "started_at": NOW, "finished_at": NOW,
         "outcome": "completed", "error": None},
    )  # fmt: skip
    cancelled = await archive.get(waiting.id)
    assert cancelled is not None
    assert cancelled.history == ()  # cancelled before it ever ran
    assert found[2][1:] == (0, "cancelled", {"n": 2}, None, "cancelled")
    # Nothing left to write: a second pass writes nothing and changes nothing.
    assert await archiver(archiving, archive).tick() == 0
    assert len(await rows(archive_url)) == 3


async def test_a_daemon_that_does_not_archive_hands_nothing_off(store: Store, redis: Redis) -> None:
    [job] = await enqueue(store, 1)
    await finish(store, [job], "completed", "1", at=NOW)
    assert await redis.exists(K.archive(Q)) == 0


async def test_a_dead_letter_retried_then_finished_is_archived_twice(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    [job] = await enqueue(archiving, 1, max_attempts=1)
    await finish(archiving, [job], "failed", "boom", at=NOW)
    assert await archiver(archiving, archive).tick() == 1
    assert await archiving.retry(Q, job.id, now=NOW + 10) == "failed"
    await finish(archiving, [job], "completed", '"ok"', at=NOW + 20)
    assert await archiver(archiving, archive).tick() == 1
    found = await rows(archive_url)
    assert [(r[1], r[2], r[4], r[5]) for r in found] == [
        (1, "failed", None, "boom"),
        (1, "completed", "ok", None),
    ]


async def test_a_job_retried_before_it_was_archived_keeps_its_final_state_for_the_archive(
    archiving: Store, archive: Archive, archive_url: str, redis: Redis
) -> None:
    [job] = await enqueue(archiving, 1, max_attempts=1)
    await finish(archiving, [job], "failed", "boom", at=NOW)
    assert await archiving.retry(Q, job.id, now=NOW + 10) == "failed"
    # The record is queued again; what it said when it failed waits in a copy.
    assert await redis.hlen(K.archive_kept(Q)) == 1
    await finish(archiving, [job], "completed", '"ok"', at=NOW + 20)
    assert await archiver(archiving, archive).tick() == 2
    found = await rows(archive_url)
    assert [(r[2], r[5]) for r in found] == [("failed", "boom"), ("completed", None)]
    # The copy kept its history too: one attempt, failed; the second row has both.
    newest = (await archive.page(Filters(), 1, None)).jobs[0]
    assert [entry["outcome"] for entry in newest.history] == ["failed", "completed"]
    older = (await archive.page(Filters(state="failed"), 1, None)).jobs[0]
    assert [entry["outcome"] for entry in older.history] == ["failed"]
    assert await redis.exists(K.archive(Q), K.archive_kept(Q)) == 0


async def test_a_job_retried_while_the_archiver_reads_it_is_archived_from_its_copy(
    archiving: Store, archive: Archive, archive_url: str, redis: Redis, caplog: Any
) -> None:
    # The archiver takes entries, then reads their records, in two round trips: a job
    # retried in between is read queued. That read is not written, and its entry, moved
    # to a kept copy, is not removed: the copy is archived, then the retried job's end.
    [job] = await enqueue(archiving, 1, max_attempts=1)
    await finish(archiving, [job], "failed", "boom", at=NOW)
    read, retried = archiving._archived_records, anyio.Event()

    async def retried_first(queue: str, entries: list[str]) -> Any:
        if not retried.is_set():
            retried.set()
            assert await archiving.retry(Q, job.id, now=NOW + 10) == "failed"
        return await read(queue, entries)

    archiving._archived_records = retried_first  # type: ignore[method-assign]
    assert await archiver(archiving, archive).tick() == 0
    assert await archiver(archiving, archive).tick() == 1
    assert [(r[2], r[5]) for r in await rows(archive_url)] == [("failed", "boom")]
    await finish(archiving, [job], "completed", '"ok"', at=NOW + 20)
    assert await archiver(archiving, archive).tick() == 1
    found = await rows(archive_url)
    assert [(r[2], r[5]) for r in found] == [("failed", "boom"), ("completed", None)]
    assert await redis.exists(K.archive(Q), K.archive_kept(Q)) == 0
    assert "dropped" not in caplog.text  # moved on, not a stray


async def test_a_job_deleted_before_it_was_archived_is_archived_still(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    [job] = await enqueue(archiving, 1)
    await finish(archiving, [job], "completed", "7", at=NOW)
    assert await archiving.delete(Q, job.id) == "completed"
    assert await archiving.get_job(job.id, [Q]) is None
    assert await archiver(archiving, archive).tick() == 1
    assert [(r[0], r[4]) for r in await rows(archive_url)] == [(job.id, 7)]


async def test_the_janitor_keeps_every_job_until_it_is_archived(
    archiving: Store, archive: Archive
) -> None:
    jobs = await enqueue(archiving, 3)
    await finish(archiving, jobs, "completed", "1", at=NOW)
    assert await archiving.trim(Q, "completed", cutoff=NOW + DAY_MS) == 0
    assert all([await archiving.get_job(job.id, [Q]) for job in jobs])
    await archiver(archiving, archive).tick()
    assert await archiving.trim(Q, "completed", cutoff=NOW + DAY_MS) == 3


async def test_jobs_waiting_for_the_archive_do_not_keep_newer_ones_from_retention(
    archiving: Store, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The oldest jobs past retention wait for the archive (turned off since, say): the
    # newer ones, which a daemon without it ended, go all the same, however many wait.
    monkeypatch.setattr(store_module, "BATCH", 3)
    waiting = await enqueue(archiving, 7)
    await finish(archiving, waiting, "completed", "1", at=NOW)
    newer = await enqueue(store, 2)
    await finish(store, newer, "completed", "1", at=NOW + 1)
    assert await archiving.trim(Q, "completed", cutoff=NOW + DAY_MS) == 2
    assert all([await archiving.get_job(job.id, [Q]) for job in waiting])
    assert not any([await archiving.get_job(job.id, [Q]) for job in newer])


async def test_one_daemon_at_a_time_archives_a_queue_and_a_stopped_one_lets_go(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    jobs = await enqueue(archiving, 4)
    await finish(archiving, jobs[:2], "completed", "1", at=NOW)
    first, second = archiver(archiving, archive, "a"), archiver(archiving, archive, "b")
    assert await first.tick() == 2
    await finish(archiving, jobs[2:], "completed", "1", at=NOW + 1)
    # The first holds the queue for its lease: the second leaves it alone...
    assert await second.tick() == 0
    # ...until the first lets go, as it does when its daemon stops.
    await first.stop()
    assert await second.tick() == 2
    assert len(await rows(archive_url)) == 4


async def test_the_archiver_reads_the_next_batch_while_postgresql_writes_one(
    archiving: Store, archive: Archive, archive_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read and written one after the other, the two took turns on the machine's cores and
    # the archive fell behind a fast drain: each full batch's successor is read meanwhile.
    jobs = await enqueue(archiving, 25)
    await finish(archiving, jobs, "completed", "1", at=NOW)
    events: list[tuple[str, int]] = []
    take, write = archiving.take_archive, archive.write

    async def watched_take(*args: Any, **options: Any) -> Any:
        events.append(("take", options.get("skip", 0)))
        return await take(*args, **options)

    async def watched_write(records: Any) -> None:
        events.append(("write", len(records)))
        await write(records)
        events.append(("written", len(records)))

    monkeypatch.setattr(archiving, "take_archive", watched_take)
    monkeypatch.setattr(archive, "write", watched_write)
    assert await archiver(archiving, archive, batch=10).tick() == 25
    assert events == [
        ("take", 0),
        ("write", 10), ("take", 10), ("written", 10),
        ("write", 10), ("take", 10), ("written", 10),
        ("write", 5), ("written", 5),
    ]  # fmt: skip
    found = await rows(archive_url)
    assert sorted(r[0] for r in found) == sorted(job.id for job in jobs)


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.DataError("a value PostgreSQL refuses"),
        # An OperationalError, but of one statement: the database answers.
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    ],
)
async def test_a_queue_whose_batch_postgresql_refuses_leaves_the_other_queues_archived(
    archiving: Store,
    archive: Archive,
    archive_url: str,
    monkeypatch: pytest.MonkeyPatch,
    error: psycopg.Error,
) -> None:
    refused = await ended_in(archiving, "a", 2)
    others = await ended_in(archiving, "b", 3)
    write = archive.write

    async def refusing(records: Any) -> None:
        if any(r.queue == "a" for r in records):
            raise error
        await write(records)

    monkeypatch.setattr(archive, "write", refusing)
    archiving_ab = archiver(archiving, archive, queues=("a", "b"))
    with pytest.raises(type(error)) as raised:
        await archiving_ab.tick()
    # The error reaches the loop's policy, naming its queue; queue b, after it, is written.
    assert "while archiving queue a" in (raised.value.__notes__ or [])
    assert sorted(r[0] for r in await rows(archive_url)) == sorted(j.id for j in others)
    monkeypatch.setattr(archive, "write", write)
    assert await archiving_ab.tick() == 2
    assert len(await rows(archive_url)) == 5
    assert sorted(r[0] for r in await rows(archive_url, "queue = 'a'")) == sorted(
        j.id for j in refused
    )


async def test_a_database_that_does_not_answer_ends_the_pass_at_once(
    archiving: Store, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every queue would wait for it alike: the loop reports it and tries again later.
    await ended_in(archiving, "a", 1)
    await ended_in(archiving, "b", 1)
    writes: list[str] = []

    async def down(records: Any) -> None:
        writes.append(records[0].queue)
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(archive, "write", down)
    with pytest.raises(psycopg.OperationalError):
        await archiver(archiving, archive, queues=("a", "b")).tick()
    assert writes == ["a"]


async def test_a_long_backlog_does_not_keep_another_queue_waiting_for_its_end(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    await ended_in(archiving, "a", 2 * ROUNDS + 5)
    other = await ended_in(archiving, "b", 1)
    archiving_ab = archiver(archiving, archive, queues=("a", "b"), batch=2)
    # ROUNDS batches of queue a, then queue b's job; a's rest in the next pass.
    assert await archiving_ab.tick() == 2 * ROUNDS + 1
    assert [r[0] for r in await rows(archive_url, "queue = 'b'")] == [other[0].id]
    assert await archiving_ab.tick() == 5
    assert len(await rows(archive_url)) == 2 * ROUNDS + 6


async def test_a_batch_of_large_jobs_ends_at_its_byte_budget(
    archiving: Store, archive: Archive, archive_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jobs of a MiB each must not make a batch of a GiB: read in chunks that would fit
    # the bytes left, it ends with the chunk that passes them, and the rest waits.
    monkeypatch.setattr(store_module, "ARCHIVE_CHUNK", 2)
    monkeypatch.setattr(store_module, "ARCHIVE_BYTES", 5000)
    jobs = [new_job(payload={"text": "x" * 2000, "n": n}) for n in range(9)]
    for job in jobs:
        assert await archiving.enqueue(job)
    await finish(archiving, jobs, "completed", "1", at=NOW)
    taken = await archiving.take_archive(Q, ME, 100, lease_ms=1000)
    assert taken is not None
    # A queue's first take: chunks of ARCHIVE_CHUNK (2 jobs of 2,000 bytes and more),
    # then of as many as would fit were each as large as the largest so far (1).
    assert [each.entry for each in taken] == [job.id for job in jobs[:3]]
    assert all(each.record is not None for each in taken)
    # A pass writes such a batch; the loop passes again at once after one that wrote.
    writer = archiver(archiving, archive)
    assert [await writer.tick() for _ in range(4)] == [3, 3, 3, 0]
    assert sorted(r[0] for r in await rows(archive_url)) == sorted(job.id for job in jobs)


async def test_an_entry_written_twice_changes_nothing(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    jobs = await enqueue(archiving, 2)
    await finish(archiving, jobs, "completed", "1", at=NOW)
    finished = await handed_off(archiving)
    # A daemon that wrote the batch and died before removing it from the hand-off: the
    # next one writes the same rows again.
    await archive.write(finished)
    await archive.write(finished)
    assert await archiver(archiving, archive).tick() == 2
    assert len(await rows(archive_url)) == 2


async def test_text_postgresql_cannot_hold_is_archived_as_the_replacement_character(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    job = new_job(payload={"name": "a\x00b", "path": "c:\\u0000"})
    await archiving.enqueue(job)
    await finish(archiving, [job], "failed", "bad \x00 byte", at=NOW)
    await archiver(archiving, archive).tick()
    [found] = await rows(archive_url)
    assert found[3] == {"name": "a\ufffdb", "path": "c:\\u0000"}
    assert found[5] == "bad \ufffd byte"


async def test_listing_pages_newest_first_and_filters(archiving: Store, archive: Archive) -> None:
    jobs = [new_job(payload={"n": n, "even": n % 2 == 0}) for n in range(7)]
    for job in jobs:
        await archiving.enqueue(job)
    for n, job in enumerate(jobs):
        await finish(archiving, [job], "completed" if n % 3 else "failed", "1", at=NOW + n)
    await archiver(archiving, archive).tick()

    seen: list[str] = []
    cursor = None
    while True:
        page = await archive.page(Filters(), limit=3, cursor=cursor)
        seen += [job.id for job in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [job.id for job in reversed(jobs)]

    failed = await archive.page(Filters(state="failed"), limit=10, cursor=None)
    assert [job.payload["n"] for job in failed.jobs] == [6, 3, 0]
    even = await archive.page(Filters(contains='{"even": true}'), limit=10, cursor=None)
    assert [job.payload["n"] for job in even.jobs] == [6, 4, 2, 0]
    window = Filters(since=NOW + 2, until=NOW + 4, type="echo", queue=Q)
    assert [j.payload["n"] for j in (await archive.page(window, 10, None)).jobs] == [3, 2]
    assert await archive.get(jobs[3].id) == (await archive.page(window, 1, None)).jobs[0]


async def test_migrations_from_an_empty_database_and_from_the_previous_version(
    archive_url: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(archive_url, autocommit=True) as conn:
        # The database as the previous version of the schema left it, with a row.
        await conn.execute(f"CREATE TABLE {VERSIONS} (version integer PRIMARY KEY,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
        await conn.execute(MIGRATIONS[0])
        await conn.execute(f"INSERT INTO {VERSIONS} (version) VALUES (1)")
        await conn.execute(
            "CREATE TABLE taskd_jobs_p20251206 PARTITION OF taskd_jobs"
            " FOR VALUES FROM ('2025-12-06') TO ('2025-12-07')"
        )
        await conn.execute(
            "INSERT INTO taskd_jobs (id, attempts, finished_at, queue, type, state, payload,"
            " priority, max_attempts, created_at, history) VALUES ('x', 1,"
            " '2025-12-06T10:00:00Z', 'default', 'echo', 'completed', '{}', 5, 3,"
            " '2025-12-06T09:00:00Z', '[]')"
        )
    # Daemons starting at once: each migrates, one after the other, and each step once.
    dbs = [Archive(url=archive_url, keep_days=0) for _ in range(4)]
    for db in dbs:
        await db.open()
    async with anyio.create_task_group() as tg:
        for db in dbs:
            tg.start_soon(db.migrate)
    for db in dbs:
        await db.close()
    async with await psycopg.AsyncConnection.connect(archive_url) as conn:
        cursor = await conn.execute(f"SELECT version FROM {VERSIONS} ORDER BY version")
        assert [row[0] for row in await cursor.fetchall()] == list(range(1, len(MIGRATIONS) + 1))
        cursor = await conn.execute("SELECT id FROM taskd_jobs")
        assert await cursor.fetchall() == [("x",)]
        cursor = await conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'taskd_jobs' ORDER BY 1"
        )
        assert [row[0] for row in await cursor.fetchall()] == [
            "taskd_jobs_finished", "taskd_jobs_payload", "taskd_jobs_pkey",
            "taskd_jobs_queue", "taskd_jobs_state", "taskd_jobs_type",
        ]  # fmt: skip


async def test_partitions_past_keep_days_are_dropped(archiving: Store, archive_url: str) -> None:
    jobs = await enqueue(archiving, 4)
    for n, job in enumerate(jobs):
        await finish(archiving, [job], "completed", "1", at=NOW - n * DAY_MS)
    async with opened(archive_url, keep_days=2) as db:
        await archiver(archiving, db).tick()
    # A day's partition goes once all of it is past keep_days: the oldest only.
    assert [r[0] for r in await rows(archive_url)] == [j.id for j in reversed(jobs[:3])]


async def test_a_partition_another_daemon_dropped_is_made_again(
    archiving: Store, archive_url: str
) -> None:
    # A job that ended over keep_days ago, archived late (after an outage), by a daemon
    # that made its day's partition before another daemon's expiry dropped it.
    jobs = await enqueue(archiving, 2)
    for n, job in enumerate(jobs):
        await finish(archiving, [job], "completed", "1", at=NOW - 10 * DAY_MS + n)
    first, second = await handed_off(archiving)
    async with opened(archive_url, keep_days=0) as writer:
        await writer.write([first])
        async with opened(archive_url, keep_days=1) as expirer:
            assert len(await expirer.drop_expired(NOW)) == 1
        await writer.write([second])
    assert [r[0] for r in await rows(archive_url)] == [jobs[1].id]


async def test_a_long_read_of_the_table_holds_up_neither_a_new_days_write_nor_the_reader(
    archiving: Store, archive: Archive, archive_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A report in SQL holds the table for as long as it runs: a new day's partition is
    # made and written meanwhile, and the drop of an expired one gives up and waits for
    # the next expiry instead of holding every statement behind it.
    monkeypatch.setattr(db_module, "DROP_LOCK_TIMEOUT", 0.2)
    jobs = await enqueue(archiving, 2)
    await finish(archiving, jobs[:1], "completed", "1", at=NOW - 40 * DAY_MS)
    await archive.write(await handed_off(archiving))
    async with await psycopg.AsyncConnection.connect(archive_url) as report:
        await report.execute("SELECT count(*) FROM taskd_jobs")  # its transaction stays open
        await finish(archiving, jobs[1:], "completed", "1", at=NOW)
        with anyio.fail_after(5):
            await archive.write(await handed_off(archiving))
            assert await archive.drop_expired(NOW) == []
    assert [r[0] for r in await rows(archive_url)] == [jobs[0].id, jobs[1].id]
    assert len(await archive.drop_expired(NOW)) == 1
    assert [r[0] for r in await rows(archive_url)] == [jobs[1].id]


async def test_the_server_stops_a_statement_that_runs_past_the_timeout(
    archive_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "TIMEOUT", 0.5)
    async with opened(archive_url) as db, db._pool.connection() as conn:
        with pytest.raises(psycopg.errors.QueryCanceled):
            await conn.execute("SELECT pg_sleep(5)")


async def test_a_partition_detached_by_hand_is_attached_again(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    jobs = await enqueue(archiving, 2)
    await finish(archiving, jobs[:1], "completed", "1", at=NOW)
    await archive.write(await handed_off(archiving))
    async with await psycopg.AsyncConnection.connect(archive_url, autocommit=True) as conn:
        await conn.execute("ALTER TABLE taskd_jobs DETACH PARTITION taskd_jobs_p20251206")
    await finish(archiving, jobs[1:], "completed", "1", at=NOW + 1)
    async with opened(archive_url) as fresh:  # a daemon started since
        await fresh.write(await handed_off(archiving))
    assert [r[0] for r in await rows(archive_url)] == [job.id for job in jobs]


async def test_a_database_not_in_utf8_is_refused_naming_its_encoding(
    postgres_server: PostgresServer,
) -> None:
    # Some text would be refused, its batch with it for ever, or garbled.
    postgres_server.psql(
        "postgres",
        "CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    async with opened(postgres_server.url_of("latin")) as db:
        with pytest.raises(RuntimeError, match="encoding is LATIN1; taskd needs UTF8"):
            await db.migrate()


async def test_a_full_redis_is_archived_and_emptied_all_the_same(
    small_redis: RedisServer, archive: Archive, archive_url: str
) -> None:
    store = Store.from_url(small_redis.url, prefix="taskd", archive=True)
    redis = Redis.from_url(small_redis.url)
    try:
        jobs = await enqueue(store, 50)
        await finish(store, jobs, "completed", "1", at=NOW)
        await fill(redis)  # past maxmemory: Redis refuses every write that takes room
        # The lease cannot be written, but the archive is, and its entries go.
        assert await archiver(store, archive).tick() == 50
        assert len(await rows(archive_url)) == 50
        assert await redis.zcard(K.archive(Q)) == 0
        assert await store.trim(Q, "completed", cutoff=NOW + DAY_MS) == 50
    finally:
        await redis.aclose()
        await store.close()


async def test_the_documented_queries_run_on_the_archive(
    archiving: Store, archive: Archive, archive_url: str
) -> None:
    jobs = await enqueue(archiving, 3)
    await finish(archiving, jobs[:2], "completed", "1", at=NOW)
    await finish(archiving, jobs[2:], "failed", "boom", at=NOW)
    await archiver(archiving, archive).tick()
    text = (REPO / "docs" / "archive.md").read_text()
    blocks = re.findall(r"(?ms)^```sql\n(.*?)^```", text)
    assert blocks
    async with await psycopg.AsyncConnection.connect(archive_url) as conn:
        for block in blocks:
            for statement in filter(str.strip, block.split(";")):
                await conn.execute(statement)


async def test_a_daemon_that_does_not_archive_keeps_what_another_handed_off(
    archiving: Store, store: Store, archive: Archive, archive_url: str
) -> None:
    # A mixed fleet: `archiving` ended the jobs; `store` (no [archive]) deletes one and
    # retries the other by hand before the archive has them.
    done, dead = await enqueue(archiving, 2, max_attempts=1)
    await finish(archiving, [done], "completed", "1", at=NOW)
    await finish(archiving, [dead], "failed", "boom", at=NOW)
    assert await store.delete(Q, done.id) == "completed"
    assert await store.retry(Q, dead.id, now=NOW + 1) == "failed"
    assert await archiver(archiving, archive).tick() == 2
    assert [(r[0], r[2]) for r in await rows(archive_url)] == [
        (done.id, "completed"),
        (dead.id, "failed"),
    ]
