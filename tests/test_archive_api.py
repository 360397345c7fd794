"""Reading the archive over HTTP, on a real Redis and a real PostgreSQL: GET /archive's filters,
pages and refusals, GET /jobs/ID for a job Redis let go, and the answers without an archive
or while PostgreSQL is down."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
import psycopg
import pytest

from taskd.archive import Archive
from taskd.archive_reads import READ_TIMEOUT, ArchiveReads
from taskd.bench.postgres import PostgresServer
from taskd.jobs import new_id, now_ms
from taskd.store import Store
from taskd.validation import parse_archive_query
from tests.support import DaemonApi, get_json, post_json, wait_for_state, wait_until

TOKEN = "archive-reader-0123456789"


async def archive_page(
    session: aiohttp.ClientSession, url: str, **params: Any
) -> tuple[int, dict[str, Any]]:
    status, body = await get_json(session, f"{url}/archive?{urlencode(params)}")
    return status, body


async def listed(session: aiohttp.ClientSession, url: str, **params: Any) -> list[dict[str, Any]]:
    """Every archived job GET /archive lists for `params`, following next_cursor."""
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        status, page = await archive_page(
            session, url, **params, **({"cursor": cursor} if cursor else {})
        )
        assert status == 200, page
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return jobs


async def wait_archived(session: aiohttp.ClientSession, url: str, ids: list[str]) -> None:
    async def all_there() -> bool:
        status, page = await archive_page(session, url, limit=1000)
        return status == 200 and {job["id"] for job in page["jobs"]} >= set(ids)

    await wait_until(all_there, f"{len(ids)} jobs in the archive")


async def trim_completed(redis_url: str) -> int:
    """What the janitor does once the retention is over: delete the completed jobs (those
    already archived: it keeps the others for the archiver)."""
    store = Store.from_url(redis_url, prefix="taskd")
    try:
        return await store.trim("default", "completed", cutoff=now_ms())
    finally:
        await store.close()


def ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def newest_first(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(jobs, key=lambda job: (job["finished_at"], job["id"]), reverse=True)


async def test_a_job_redis_let_go_is_answered_from_the_archive(
    daemon_api: DaemonApi, archive_url: str, redis_url: str
) -> None:
    async with daemon_api(archive={"url": archive_url}) as (_, (session, url)):
        status, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": [1]})
        assert status == 201, job
        live = await wait_for_state(session, url, job["id"], {"completed"})
        await wait_archived(session, url, [job["id"]])
        # Answered from Redis: the job document as ever, without the archive's mark.
        assert "archived" not in live
        assert await trim_completed(redis_url) == 1

        status, found = await get_json(session, f"{url}/jobs/{job['id']}")
        assert status == 200, found
        assert found == {**live, "archived": True}
        # Neither in Redis nor in the archive: not found, as without an archive.
        for missing in (new_id(), "no-such-job", "%00"):
            status, body = await get_json(session, f"{url}/jobs/{missing}")
            assert (status, body["error"]["code"]) == (404, "not_found"), (missing, body)


async def test_the_archive_lists_newest_first_filtered_and_paged(
    daemon_api: DaemonApi, archive_url: str
) -> None:
    async with daemon_api(archive={"url": archive_url}) as (_, (session, url)):
        echoes = [{"type": "echo", "payload": {"n": n, "tag": "ab"[n % 2]}} for n in range(6)]
        fails = [
            {"type": "fail", "payload": {"message": "boom", "n": n}, "max_attempts": 1}
            for n in range(3)
        ]
        ended = []
        # One after the other, so that no two end in the same millisecond.
        for submission in echoes + fails:
            status, job = await post_json(session, f"{url}/jobs", submission)
            assert status == 201, job
            await wait_for_state(session, url, job["id"], {"completed", "failed"})
            ended.append(job["id"])
        status, later = await post_json(session, f"{url}/jobs", {"type": "echo", "delay": 3600})
        assert status == 201, later
        status, _ = await post_json(session, f"{url}/jobs/{later['id']}/cancel", {})
        assert status == 200
        await wait_archived(session, url, [*ended, later["id"]])

        everything = await listed(session, url, limit=1000)
        assert len(everything) == 10
        assert [job["id"] for job in everything] == [later["id"], *reversed(ended)]
        assert everything == newest_first(everything)
        assert all(job["archived"] is True for job in everything)

        async def ids(**params: Any) -> list[str]:
            return [job["id"] for job in await listed(session, url, **params)]

        def expected(keep: Any) -> list[str]:
            return [job["id"] for job in everything if keep(job)]

        assert await ids(type="fail") == expected(lambda j: j["type"] == "fail")
        assert len(await ids(type="fail")) == 3
        assert await ids(state="cancelled") == [later["id"]]
        assert await ids(state="completed", type="echo") == expected(
            lambda j: j["state"] == "completed"
        )
        assert await ids(q='{"tag": "a"}') == expected(
            lambda j: (j["payload"] or {}).get("tag") == "a"
        )
        assert await ids(q='{"n": 2}', type="fail") == expected(
            lambda j: j["type"] == "fail" and j["payload"]["n"] == 2
        )
        assert await ids(queue="default") == expected(lambda j: True)
        assert await ids(queue="images") == []

        # A window of finish times: since (RFC 3339) is in, until (epoch seconds) is out.
        since, until = everything[7]["finished_at"], ms(everything[2]["finished_at"])
        window = await ids(since=since, until=f"{until / 1000:.3f}")
        assert window == [job["id"] for job in everything[3:8]]

        # Pages of 3 (and of 4 among the echoes) add up to the whole list, in order.
        assert await ids(limit=3) == [job["id"] for job in everything]
        assert await ids(limit=4, type="echo") == expected(lambda j: j["type"] == "echo")
        status, last = await archive_page(session, url, limit=10)
        assert (status, last["next_cursor"]) == (200, None)


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# Each a query GET /archive refuses with 400 invalid_query, and what its message says.
BAD_QUERIES = [
    ({"status": "failed"}, "unknown parameter(s) status"),
    ({"state": "queued"}, "'state' must be one of completed, failed, cancelled"),
    ({"state": "bogus"}, "'state' must be one of completed, failed, cancelled"),
    ({"limit": "0"}, "'limit' must be from 1 to 1000"),
    ({"limit": "1001"}, "'limit' must be from 1 to 1000"),
    ({"limit": "ten"}, "'limit' must be from 1 to 1000"),
    ({"type": "a b"}, "'type' is not a job type's name"),
    ({"type": "echo\x00"}, "'type' is not a job type's name"),
    ({"queue": "-dash"}, "'queue' is not a queue's name"),
    ({"since": "yesterday"}, "'since' is not an RFC 3339 time with a UTC offset"),
    ({"since": "2026-12-04T10:00:00"}, "'since' is not an RFC 3339 time with a UTC offset"),
    ({"until": "2026-02-30T10:00:00Z"}, "'until' is not a valid time"),
    ({"until": "-5"}, "'until' is not an RFC 3339 time"),
    ({"since": "100000000000"}, "'since' is out of range"),
    ({"since": "2000", "until": "1000"}, "'until' must be later than 'since'"),
    ({"q": "{tag: 1}"}, "'q' is not valid JSON"),
    ({"q": "1e400"}, "'q' is not valid JSON"),
    ({"q": '"\\ud800"'}, "'q' is not valid JSON"),
    ({"q": "[" * 65 + "]" * 65}, "'q' nests deeper than 64 levels"),
    ({"cursor": "not a cursor"}, "'cursor' is not one GET /archive gave out"),
    ({"cursor": "01a20d20-0000-7000-8000-000000000000"}, "'cursor' is not one GET /archive"),
    ({"cursor": _cursor("1:\x00")}, "'cursor' is not one GET /archive gave out"),
    ({"cursor": _cursor("9" * 15 + ":" + new_id())}, "'cursor' is not one GET /archive"),
]


async def test_every_bad_parameter_is_refused_naming_it(
    daemon_api: DaemonApi, archive_url: str
) -> None:
    async with daemon_api(archive={"url": archive_url}) as (_, (session, url)):
        for params, message in BAD_QUERIES:
            status, body = await archive_page(session, url, **params)
            assert (status, body["error"]["code"]) == (400, "invalid_query"), (params, body)
            assert message in body["error"]["message"], (params, body)
        # What PostgreSQL could not take but a payload could hold: asked for, not refused.
        for q in ('"a\\u0000b"', "null", "18446744073709551616"):
            status, body = await archive_page(session, url, q=q)
            assert (status, body) == (200, {"jobs": [], "next_cursor": None}), (q, body)
        # A '+' left unencoded in an offset arrives as a space, and is taken for a '+'.
        async with session.get(f"{url}/archive?since=2026-12-04T10:00:00+02:00") as response:
            assert response.status == 200, await response.text()


async def test_without_an_archive_the_answers_say_so_and_need_the_token(
    daemon_api: DaemonApi,
) -> None:
    async with daemon_api(server={"token": TOKEN}) as (_, (session, url)):
        status, body = await archive_page(session, url)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{url}/archive?state=completed", headers=headers) as response:
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (404, "archive_not_configured")
            assert "[archive] url" in body["error"]["message"]
        async with session.get(f"{url}/jobs/{new_id()}", headers=headers) as response:
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.timeout(120)
async def test_while_postgresql_is_down_archive_reads_answer_503_and_redis_reads_do_not(
    daemon_api: DaemonApi, own_postgres: PostgresServer
) -> None:
    archive = {"url": own_postgres.url_of("archive")}
    async with daemon_api(archive=archive) as (_, (session, url)):
        gone, kept = [
            (await post_json(session, f"{url}/jobs", {"type": "echo", "payload": n}))[1]["id"]
            for n in range(2)
        ]
        await wait_archived(session, url, [gone, kept])
        async with session.delete(f"{url}/jobs/{gone}") as response:
            assert response.status == 200
        own_postgres.stop()

        for path in (f"/jobs/{gone}", "/archive", "/archive?type=echo&q=1"):
            started = time.monotonic()
            status, body = await get_json(session, f"{url}{path}")
            took = time.monotonic() - started
            # Its own error: not Redis's 503, though [redis] request_timeout (2 s) is shorter.
            assert (status, body["error"]["code"]) == (503, "archive_unavailable"), (path, body)
            assert "PostgreSQL" in body["error"]["message"]
            assert took < READ_TIMEOUT + 10, took
        # What Redis holds is answered as ever, and the daemon is healthy.
        status, job = await get_json(session, f"{url}/jobs/{kept}")
        assert (status, job["state"]) == (200, "completed")
        assert "archived" not in job
        status, health = await get_json(session, f"{url}/health")
        assert (status, health) == (200, {"status": "ok"})

        own_postgres.start()

        async def answered() -> bool:
            status, job = await get_json(session, f"{url}/jobs/{gone}")
            return status == 200 and job["archived"] is True

        await wait_until(answered, "the archive to answer again", deadline=60)


async def test_a_read_the_database_holds_up_answers_503_at_its_bound_and_leaves_no_harm(
    daemon_api: DaemonApi, archive_url: str
) -> None:
    async with daemon_api(archive={"url": archive_url}) as (_, (session, url)):
        status, job = await post_json(session, f"{url}/jobs", {"type": "echo"})
        await wait_archived(session, url, [job["id"]])
        locker = await psycopg.AsyncConnection.connect(archive_url)
        async with locker, locker.transaction():
            # Reachable, but every read of the table waits: as a query that hangs.
            await locker.execute("LOCK TABLE taskd_jobs IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            status, body = await archive_page(session, url)
            took = time.monotonic() - started
            assert (status, body["error"]["code"]) == (503, "archive_unavailable"), body
            assert f"did not answer within {READ_TIMEOUT:g} s" in body["error"]["message"]
            assert READ_TIMEOUT - 0.5 <= took < READ_TIMEOUT + 10, took
        # The read given up left the pool whole: the next one is answered.
        status, page = await archive_page(session, url)
        assert (status, [each["id"] for each in page["jobs"]]) == (200, [job["id"]])


@pytest.fixture
async def unmigrated(archive_url: str) -> AsyncIterator[Archive]:
    """An archive no archiver has written to yet: its database has no table."""
    db = Archive(url=archive_url, keep_days=30)
    await db.open()
    yield db
    await db.close()


async def test_an_archive_not_migrated_yet_holds_nothing(unmigrated: Archive) -> None:
    reads = ArchiveReads(archive=unmigrated)
    assert await reads.job(new_id()) is None
    assert await reads.page({"type": "echo"}) == {"jobs": [], "next_cursor": None}


def test_query_times_are_rfc_3339_or_epoch_seconds() -> None:
    at = 1_796_378_400_000  # 2026-12-04T10:00:00Z
    for text in ("2026-12-04T10:00:00Z", "2026-12-04T12:00:00+02:00", "1796378400"):
        assert parse_archive_query({"since": text}).since == at, text
    # An unencoded '+' arrives as a space; the fraction of a millisecond rounds up.
    assert parse_archive_query({"until": "2026-12-04T12:00:00 02:00"}).until == at
    assert parse_archive_query({"until": "1796378400.0001"}).until == at + 1
    query = parse_archive_query({"q": '{ "a" : [1, 2] }'})
    assert (query.contains, query.limit) == ('{"a":[1,2]}', 50)
