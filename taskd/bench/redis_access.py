"""Every Redis call the bench makes, one function per operation, each saying what it reads."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from taskd.jobs import Job
from taskd.store import Keys, Store

# HMGETs per pipeline when reading job records back.
READ_CHUNK = 5_000


def connect(url: str, *, single_connection: bool = False) -> aioredis.Redis:
    """A plain client of the bench's own Redis; `single_connection` pins it to one
    connection, so that it does not change the count of clients it reads."""
    return aioredis.Redis.from_url(url, single_connection_client=single_connection)


async def disconnect(client: aioredis.Redis) -> None:
    """Close a client from `connect`, and its connections."""
    await client.aclose()


def open_store(url: str, prefix: str) -> Store:
    """The daemon's own door to Redis, for putting jobs in as a daemon would."""
    return Store.from_url(url, prefix=prefix)


async def flush(client: aioredis.Redis) -> None:
    """FLUSHALL: the bench's own Redis, empty between rounds."""
    await client.flushall()


async def server_version(client: aioredis.Redis) -> str:
    """INFO server: redis_version."""
    return str((await client.info("server"))["redis_version"])


async def connected_clients(client: aioredis.Redis) -> int:
    """INFO clients: connected_clients, the bench's own connections included."""
    return int((await client.info("clients"))["connected_clients"])


async def memory_and_keys(client: aioredis.Redis) -> tuple[int, int]:
    """INFO memory used_memory (bytes) and DBSIZE, in one round trip."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.info("memory")
        pipe.dbsize()
        memory, keys = await pipe.execute()
    return int(memory["used_memory"]), int(keys)


async def finished(client: aioredis.Redis, keys: Keys, queue: str) -> tuple[int, int]:
    """ZCARD of the queue's completed and dead sets: how many jobs completed, and how many
    failed for good."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.completed(queue))
        pipe.zcard(keys.failed(queue))
        completed, failed = await pipe.execute()
    return int(completed), int(failed)


async def job_fields(
    client: aioredis.Redis, keys: Keys, queue: str, ids: Sequence[str], fields: Sequence[str]
) -> list[dict[str, bytes | None]]:
    """These fields of these jobs' hashes, raw, read with pipelined HMGETs a chunk at a time;
    in the order of `ids`."""
    rows: list[dict[str, bytes | None]] = []
    for start in range(0, len(ids), READ_CHUNK):
        async with client.pipeline(transaction=False) as pipe:
            for job_id in ids[start : start + READ_CHUNK]:
                pipe.hmget(keys.job(queue, job_id), list(fields))
            replies: list[list[bytes | None]] = await pipe.execute()
        rows += [dict(zip(fields, reply, strict=True)) for reply in replies]
    return rows


async def enqueue(store: Store, job: Job) -> None:
    """One job in, through the store's enqueue script."""
    await store.enqueue(job)


async def enqueue_many(store: Store, jobs: Sequence[Job]) -> None:
    """Jobs in, through the store's batch enqueue."""
    await store.enqueue_many(jobs)
