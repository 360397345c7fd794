"""The job record's layouts: what Python reads of the scripts' answers is what they wrote."""

from __future__ import annotations

import re

import pytest
from redis.asyncio import Redis

from taskd.jobs import ACTIVE
from taskd.store import Keys, Store
from taskd.store.record import (
    ARCHIVED,
    CLAIMED_JOB,
    NEW_JOB,
    decode_archive_record,
    decode_claimed,
    id_bytes,
    new_job_args,
)
from tests.builders import enqueue, new_job, stored
from tests.support import ECHO

K = Keys("taskd")
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 k=v"
# One distinct value per CLAIMED_JOB entry, as Redis sends it, and the field it becomes.
CLAIMED = {
    "id": (b"j-1", "j-1"),
    "type": (b"echo", "echo"),
    "payload": (b'{"n": 7}', {"n": 7}),
    "attempts": (b"2", 2),
    "created_at": (b"1000", 1000),
    "max_attempts": (b"5", 5),
    "started_at": (b"3000", 3000),
    "waited_ms": (b"40", 40),
    "callback_url": (b"http://cb.example/done", "http://cb.example/done"),
    "earlier_attempts": (b"6", 6),
    "trace": (b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 k=v", TRACE),
}


def test_claimed_jobs_are_read_in_the_order_claim_lua_answers() -> None:
    # decode_claimed unpacks by position: a CLAIMED_JOB reordered without it shows here.
    assert set(CLAIMED_JOB) == set(CLAIMED)
    flat = [CLAIMED[name][0] for name in CLAIMED_JOB] * 2
    jobs = decode_claimed(flat, "default", "daemon-a")
    assert len(jobs) == 2
    for name in CLAIMED_JOB:
        assert getattr(jobs[1], name) == CLAIMED[name][1], name
    assert (jobs[0].queue, jobs[0].state, jobs[0].daemon) == ("default", ACTIVE, "daemon-a")


@pytest.mark.parametrize("name", ["callback_url", "trace"])
def test_no_callback_url_or_trace_reads_as_none(name: str) -> None:
    flat = [b"" if entry == name else CLAIMED[entry][0] for entry in CLAIMED_JOB]
    assert getattr(decode_claimed(flat, "default", "daemon-a")[0], name) is None


async def test_a_claimed_job_is_the_stored_record(store: Store) -> None:
    # The two decoders of one record (claim's answer, the hash) must agree on every field
    # the claim answers; the stored one also knows what the claim leaves out.
    [job] = await enqueue(
        store, 1, callback_url="http://cb.example/done", max_attempts=4, trace=TRACE
    )
    [claimed] = (await store.claim("default", "daemon-a", 1, now=job.created_at + 5,
                                   type_limits=ECHO)).jobs  # fmt: skip
    record = await stored(store, job.id)
    for name in (*CLAIMED_JOB, "queue", "state", "daemon"):
        if name != "waited_ms":  # not a field of the hash: the claim works it out
            assert getattr(claimed, name) == getattr(record, name), name
    assert claimed.waited_ms == 5


async def test_new_jobs_are_stored_as_enqueue_lua_reads_new_job(store: Store, redis: Redis) -> None:
    # enqueue.lua reads NEW_JOB's entries by position: a distinct value in every entry,
    # over two jobs of one call, shows any entry read out of place or a wrong count.
    jobs = [
        new_job(
            f"type-{n}",
            {"n": n},
            max_attempts=n + 2,
            run_at=5_000 + n,
            idempotency_key=f"key-{n}",
            callback_url=f"http://cb.example/{n}",
            priority=n + 7,
            created_at=1_000 + n,
            trace=f"00-{n + 1:032x}-{n + 1:016x}-01",
        )
        for n in range(2)
    ]
    assert all(len(new_job_args(job)) == len(NEW_JOB) for job in jobs)
    assert await store.enqueue_many(jobs) == [job.id for job in jobs]
    for job in jobs:
        record = await stored(store, job.id)
        for name in NEW_JOB[:-1]:
            assert getattr(record, name) == getattr(job, name), name
    # The last, id_bytes: each id is in the paged index, as its bytes.
    [member] = await redis.zrange(K.pages("default"), 0, -1)
    page = K.page("default", int(member.rpartition(b":")[2]))
    assert set(await redis.hkeys(page)) == {id_bytes(job.id) for job in jobs}


def test_the_archive_staging_table_takes_the_archived_fields_in_their_order() -> None:
    # The archiver writes each record's ARCHIVED values as they come, after id and queue.
    from taskd.archive.db import _STAGING

    columns = re.findall(r"(\w+) (?:text|integer|smallint|bigint)", _STAGING)
    assert tuple(columns) == ("id", "queue", *ARCHIVED)


@pytest.mark.parametrize("copy", [b"{}", b"not json", b'["state"]', b'["state", 3]'])
def test_a_kept_copy_that_is_no_record_is_dropped_not_raised(copy: bytes) -> None:
    # Raised, it would fail its whole batch, and every later take of its queue.
    assert decode_archive_record(copy, "default", "job-1") is None
