"""The paged index (record layout 3): every stored id of a queue in pages of compact
hashes, each holding a range of ids, so that GET /jobs lists them newest first."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from redis.asyncio import Redis

from taskd.embedded import RedisServer
from taskd.jobs import new_id
from taskd.store import Inspector, Keys, Store
from taskd.store.record import RECORD_VERSION, id_text
from tests.builders import done, new_job
from tests.support import (
    ECHO,
    Api,
    base_url,
    fill,
    get_json,
    index_pages,
    indexed_ids,
    make_config,
    running_daemon,
)

Q = "default"
K = Keys("taskd")
PAGE_FILL = 100  # index.lua
PAGE_MAX = 120


async def pages(redis: Redis, queue: str = Q) -> list[tuple[str, list[str]]]:
    """Each page, in the directory's order: its first id and the ids it holds, sorted."""
    found = []
    for start, page in await index_pages(redis, queue):
        found.append((start, sorted(id_text(b) for b in await redis.hkeys(page))))
    return found


async def assert_well_formed(redis: Redis, queue: str = Q) -> list[str]:
    """Check every page holds ids of its range only (from its first id to the next page's),
    no more than PAGE_MAX, and is not empty; return all ids, oldest first."""
    listed = await pages(redis, queue)
    every: list[str] = []
    for n, (start, ids) in enumerate(listed):
        after = listed[n + 1][0] if n + 1 < len(listed) else None
        assert ids, f"page {n} is empty"
        assert len(ids) <= PAGE_MAX
        assert all(start <= i and (after is None or i < after) for i in ids), (n, start, after)
        every += ids
    assert every == sorted(every)
    assert len(set(every)) == len(every)
    return every


async def list_all(inspector: Inspector, queues: list[str], limit: int) -> list[str]:
    """Every id GET /jobs lists, following the cursor, `limit` a page."""
    ids: list[str] = []
    cursor = None
    while True:
        page = await inspector.list_jobs(
            queues, state=None, job_type=None, limit=limit, cursor=cursor
        )
        ids += [job.id for job in page.jobs]
        if page.cursor is None:
            return ids
        cursor = page.cursor


async def test_ids_in_order_fill_pages_of_a_hundred(
    store: Store, redis: Redis, inspector: Inspector
) -> None:
    jobs = [new_job(payload={"n": n}) for n in range(1050)]
    # In calls of various sizes, as the intake's group commit makes them.
    for chunk in (jobs[:1], jobs[1:250], jobs[250:251], jobs[251:1050]):
        await store.enqueue_many(chunk)
    every = await assert_well_formed(redis)
    assert every == [job.id for job in jobs]
    assert [len(ids) for _, ids in await pages(redis)] == [PAGE_FILL] * 10 + [50]
    assert await list_all(inspector, [Q], 37) == every[::-1]


async def test_ids_out_of_order_split_pages_and_keep_each_range(
    store: Store, redis: Redis, inspector: Inspector
) -> None:
    # Late submissions: ids older than ones already stored, down to below every page.
    ids = [new_id() for _ in range(1500)]
    late = ids[:]
    random.Random(7).shuffle(late)
    jobs = [new_job(id=i, payload=None) for i in late]
    for n in range(0, len(jobs), 7):
        await store.enqueue_many(jobs[n : n + 7])
    every = await assert_well_formed(redis)
    assert every == ids
    assert len(await pages(redis)) <= len(ids) // (PAGE_MAX // 2) + 1
    assert await list_all(inspector, [Q], 100) == ids[::-1]


async def test_a_listing_across_queues_and_the_sorted_set_is_one_order(
    store: Store, redis: Redis, inspector: Inspector
) -> None:
    # Jobs from a fleet that still had a daemon reading only the sorted set, then not.
    ids = [new_id() for _ in range(600)]
    store.record_version = 2
    await store.enqueue_many([new_job(id=i, queue="a") for i in ids[:100]])
    store.record_version = 3
    chosen = random.Random(3)
    for i in ids[100:]:
        await store.enqueue_many([new_job(id=i, queue=chosen.choice(["a", "b"]))])
    assert await redis.zcard(K.index("a")) == 100
    assert await list_all(inspector, ["a", "b"], 45) == ids[::-1]
    # From a cursor in the middle: the older ones only.
    page = await inspector.list_jobs(
        ["a", "b"], state=None, job_type=None, limit=3, cursor=ids[300]
    )
    assert [job.id for job in page.jobs] == [ids[299], ids[298], ids[297]]


async def test_deletes_while_listing_skip_no_job_and_repeat_none(
    store: Store, redis: Redis, inspector: Inspector
) -> None:
    jobs = [new_job(payload=None) for _ in range(700)]
    await store.enqueue_many(jobs)
    doomed = random.Random(5).sample([job.id for job in jobs], 300)
    deleted: set[str] = set()
    seen: list[str] = []
    cursor = None
    while True:
        page = await inspector.list_jobs([Q], state=None, job_type=None, limit=50, cursor=cursor)
        seen += [job.id for job in page.jobs]
        # Delete some jobs, whether listed already or still ahead of the cursor, which can
        # empty a page or leave it with a few.
        for job_id in doomed[:25]:
            assert await store.delete(Q, job_id) == "queued"
            deleted.add(job_id)
        del doomed[:25]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert len(seen) == len(set(seen))
    assert {job.id for job in jobs} - deleted <= set(seen)
    assert set(await assert_well_formed(redis)) == {job.id for job in jobs} - deleted


async def test_every_way_out_takes_the_id_out_of_its_page(store: Store, redis: Redis) -> None:
    jobs = [new_job(payload=None) for _ in range(350)]
    await store.enqueue_many(jobs)
    # Finished and trimmed, purged, deleted: each goes.
    ran = (await store.claim(Q, "d", 100, now=2, type_limits=ECHO)).jobs
    await store.ack(Q, "d", [done(job) for job in ran], now=3)
    assert await store.trim(Q, "completed", cutoff=3_600_000) == 100
    assert await store.delete(Q, jobs[-1].id) == "queued"
    assert len(await assert_well_formed(redis)) == 249
    assert sum([n async for n in store.purge(Q, "queued", now=4)]) == 249
    assert await indexed_ids(redis, Q) == []
    assert await redis.exists(K.pages(Q)) == 0


async def test_forgetting_a_queue_counts_the_jobs_in_its_pages(store: Store, redis: Redis) -> None:
    jobs = [new_job(payload=None) for _ in range(250)]
    await store.enqueue_many(jobs)
    assert await store.forget_queue(Q) == (250, 0, 0)
    assert sum([n async for n in store.purge(Q, "queued", now=4)]) == 250
    assert await store.forget_queue(Q) == (0, 0, 0)
    assert await redis.exists(*K.page_counters(Q)) == 0


@pytest.mark.parametrize(
    ("locale", "shows"),
    [
        # In C, 'B' (66) sorts before 'a' (97); under en_US.UTF-8 it does not.
        ("en_US", "return tostring('a' < 'B')"),
        # Under da_DK.UTF-8 'aa' is one letter, sorted after 'z'.
        ("da_DK", "return tostring('aa' > 'z')"),
    ],
)
def test_pages_keep_their_ranges_in_a_redis_running_in_a_utf8_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locale: str, shows: str
) -> None:
    # Lua compares strings with strcoll, in the locale Redis runs in. Under en_US.UTF-8 two
    # ids' 16 bytes compare out of byte order about half the time (measured: 22,997 of
    # 50,000 random pairs); under da_DK.UTF-8 even their text does, where 'aa' appears.
    locales = tmp_path / "locales"
    locales.mkdir()
    subprocess.run(
        ["localedef", "-i", locale, "-f", "UTF-8", str(locales / f"{locale}.UTF-8")],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("LOCPATH", str(locales))
    monkeypatch.setenv("LC_ALL", f"{locale}.UTF-8")
    server = RedisServer.start_on_free_port(data_dir=tmp_path / "redis", appendonly=False)
    try:
        anyio.run(_ids_in, server.url, shows)
    finally:
        server.stop()


async def _ids_in(url: str, shows: str) -> None:
    redis = Redis.from_url(url)
    store = Store.from_url(url, prefix="taskd")
    store.record_version = RECORD_VERSION
    try:
        assert await redis.eval(shows, 0) == b"true"  # the locale took
        # A full page of ids with 'aa', a newer page, then an id between them.
        crafted = [f"0190aa00-0000-7000-8000-{n:012x}" for n in range(PAGE_FILL)]
        crafted += ["01910000-0000-7000-8000-000000000000", "0190ab00-0000-7000-8000-000000000000"]
        for n in range(0, len(crafted), 50):
            await store.enqueue_many([new_job(id=i) for i in crafted[n : n + 50]])
        ids = [new_id() for _ in range(800)]
        late = ids[:]
        random.Random(11).shuffle(late)
        for n in range(0, len(late), 5):
            await store.enqueue_many([new_job(id=i) for i in late[n : n + 5]])
        assert await assert_well_formed(redis) == sorted(crafted) + ids
    finally:
        await store.close()
        await redis.aclose()


async def test_a_late_batch_is_cut_into_pages_that_stay_compact(store: Store, redis: Redis) -> None:
    ids = [new_id() for _ in range(1101)]
    await store.enqueue_many([new_job(id=i) for i in ids[:100]])  # a full newest page
    await store.enqueue_many([new_job(id=ids[-1])])  # a newer id starts the next
    # Another daemon's 1,000 jobs, made before that one, land in the full page.
    await store.enqueue_many([new_job(id=i) for i in ids[100:-1]])
    assert await assert_well_formed(redis) == ids
    for _, page in await index_pages(redis, Q):
        assert await redis.object("encoding", page) in {b"ziplist", b"listpack"}


def between_reads(
    inspector: Inspector, monkeypatch: pytest.MonkeyPatch, after: int, act: Any
) -> list[int]:
    """Run `act()` once, right after the listing's `after`-th read of a run of pages."""
    script = inspector._read_pages  # each run of pages is read at one moment: act between
    reads: list[int] = []

    async def read_then_act(*args: Any, **kwargs: Any) -> Any:
        out = await script(*args, **kwargs)
        reads.append(1)
        if len(reads) == after:
            await act()
        return out

    monkeypatch.setattr(inspector, "_read_pages", read_then_act)
    return reads


async def test_late_ids_splitting_pages_between_reads_lose_a_listing_no_job(
    store: Store, redis: Redis, inspector: Inspector, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The split moves ids of the page the next call's cursor falls in to a new page.
    ids = [new_id() for _ in range(241)]
    late = ids[120:141]  # in the middle page's range once the others are indexed
    stored_first = [i for i in ids if i not in set(late)]
    await store.enqueue_many([new_job(id=i) for i in stored_first])  # pages of 100, 100, 20

    async def late_ones() -> None:
        await store.enqueue_many([new_job(id=i) for i in late])

    reads = between_reads(inspector, monkeypatch, 1, late_ones)
    listed = await list_all(inspector, [Q], 50)
    assert len(reads) > 1
    assert set(stored_first) <= set(listed)
    assert listed == sorted(listed, reverse=True)
    assert len(listed) == len(set(listed))


async def test_a_first_page_lowered_between_reads_lists_its_jobs_once(
    store: Store, redis: Redis, inspector: Inspector, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [new_id() for _ in range(301)]
    await store.enqueue_many([new_job(id=i) for i in ids[1:]])  # pages of 100
    for n, job_id in enumerate(ids[1:]):
        if n % 100 >= 10:
            assert await store.delete(Q, job_id) == "queued"
    # Three pages of 10: a listing of 50 reads them, then reads on below the last one.
    # Meanwhile an id below every page arrives, and the first page now starts at it.

    async def lowest() -> None:
        await store.enqueue_many([new_job(id=ids[0])])

    between_reads(inspector, monkeypatch, 1, lowest)
    page = await inspector.list_jobs([Q], state=None, job_type=None, limit=50, cursor=None)
    listed = [job.id for job in page.jobs]
    assert len(listed) == len(set(listed))
    assert len(listed) == 31


async def test_ids_of_jobs_an_older_daemon_deleted_go_with_the_queue(
    store: Store, redis: Redis
) -> None:
    jobs = [new_job(payload=None) for _ in range(3)]
    await store.enqueue_many(jobs)
    # A daemon of the taskd before the pages deletes jobs: their records go, their ids
    # stay in the pages, and name no job to keep the queue.
    await redis.delete(*(K.job(Q, job.id) for job in jobs))
    assert sorted(await indexed_ids(redis, Q)) == sorted(job.id for job in jobs)
    assert await store.forget_queue(Q) == (0, 0, 0)
    assert await redis.exists(K.pages(Q), *K.page_counters(Q)) == 0
    assert await redis.keys(f"{K.pages(Q)}*") == []


async def test_a_listing_takes_out_ids_whose_record_is_gone(
    store: Store, redis: Redis, api: Api
) -> None:
    jobs = [new_job("no_handler_here", payload=None) for _ in range(3)]  # none runs
    await store.enqueue_many(jobs)
    await redis.delete(K.job(Q, jobs[1].id), K.job(Q, jobs[2].id))  # as an older daemon
    # The listing reads on past ids with no record, and takes them out as it goes.
    session, url = api
    status, body = await get_json(session, f"{url}/jobs?limit=1")
    assert (status, [job["id"] for job in body["jobs"]]) == (200, [jobs[0].id])
    assert await indexed_ids(redis, Q) == [jobs[0].id]


async def test_a_full_redis_lists_jobs_all_the_same(small_redis: RedisServer) -> None:
    # The listing's clean-up writes; a full Redis still takes deletions (HDEL, ZREM are
    # not refused past maxmemory), so it goes through, and the listing answers.
    redis = Redis.from_url(small_redis.url)
    store = Store.from_url(small_redis.url, prefix="taskd")
    store.record_version = RECORD_VERSION
    try:
        async with running_daemon(make_config(small_redis.url)) as daemon:
            jobs = [new_job("no_handler_here", payload=None) for _ in range(2)]
            await store.enqueue_many(jobs)
            await redis.delete(K.job(Q, jobs[1].id))  # as an older daemon
            await fill(redis)
            async with aiohttp.ClientSession() as session:
                status, body = await get_json(session, f"{base_url(daemon)}/jobs")
            assert (status, [job["id"] for job in body["jobs"]]) == (200, [jobs[0].id])
            assert await indexed_ids(redis, Q) == [jobs[0].id]
            await redis.config_set("maxmemory", 0)  # room again, for the daemon to stop
    finally:
        await store.close()
        await redis.aclose()
