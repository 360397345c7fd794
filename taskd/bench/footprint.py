"""What taskd costs Redis at rest: bytes per queued job, and an idle daemon's commands."""

from __future__ import annotations

import math

import anyio
import orjson

from taskd.bench.harness import IDLE_SECONDS, MEMORY_JOBS, QUEUE, Bench, BenchError
from taskd.bench.report import Figure

PAYLOAD_BYTES = 100  # the payload's JSON, as the issue sizes it
MEMORY_CHUNK = 10_000  # jobs built and enqueued at a time, so the bench's memory stays small
IDLE_WARMUP = 2.0  # s after the daemon is ready: its start-up's commands are not counted


def payload(size: int) -> dict[str, str]:
    """A payload whose JSON is `size` bytes."""
    padding = size - len(orjson.dumps({"pad": ""}))
    if padding < 0:
        raise ValueError(f"no payload of this shape is {size} bytes")
    return {"pad": "x" * padding}


async def memory(bench: Bench) -> list[Figure]:
    """N noop jobs with a 100-byte payload queued (no daemon): Redis bytes per job, and
    what the job's hash, the ready lists and the index take of them."""
    local = bench.need_local()
    n = bench.scaled(MEMORY_JOBS)
    before, _ = await local.inspector.memory_and_keys()
    sample = ""
    for start in range(0, n, MEMORY_CHUNK):
        ids = await local.enqueue(min(MEMORY_CHUNK, n - start), "noop", payload(PAYLOAD_BYTES))
        sample = sample or ids[0]
    after, _ = await local.inspector.memory_and_keys()
    footprint = await local.inspector.footprint(QUEUE, sample)
    if footprint.ready_ids != n or footprint.index_ids != n:
        raise BenchError(
            f"{n:,} jobs enqueued, but {footprint.ready_ids:,} are ready and "
            f"{footprint.index_ids:,} indexed"
        )
    total = (after - before) / n
    parts = {
        "job hash": footprint.job_bytes,
        "ready lists": footprint.ready_bytes / n,
        "index": footprint.index_bytes / n,
    }
    bench.note(
        f"memory: {n:,} noop jobs with a {PAYLOAD_BYTES}-byte payload, queued with no daemon; "
        "bytes per job: INFO memory used_memory before and after; its parts: MEMORY USAGE "
        "of one job's hash (key and keyspace entry included), and of the ready lists and the "
        "index over the jobs; other: the rest, mostly the keyspace's own table"
    )
    bench.note(
        f"memory: a job's hash is {footprint.job_encoding}-encoded (Redis keeps a hash "
        "compact, as a ziplist or listpack, only while every value is at most "
        f"hash-max-ziplist-value = {footprint.compact_value_limit} bytes); the index's "
        f"pages are {footprint.index_encoding}-encoded hashes of 16-byte ids"
    )
    return [
        Figure("Redis memory", "bytes/job", total),
        *(Figure(name, "bytes/job", value) for name, value in parts.items()),
        Figure("other", "bytes/job", total - sum(parts.values())),
    ]


async def idle(bench: Bench) -> list[Figure]:
    """One daemon with nothing to do: the Redis commands it makes per second."""
    local = bench.need_local()
    seconds = bench.scaled(IDLE_SECONDS)
    async with bench.daemons(1, concurrency=100) as [daemon]:
        await anyio.sleep(IDLE_WARMUP)
        # The bench stays silent in between: INFO, which asks, is not counted.
        before = await local.inspector.command_calls()
        await anyio.sleep(seconds)
        after = await local.inspector.command_calls()
        if daemon.proc.poll() is not None:
            raise BenchError(f"the daemon exited ({daemon.proc.returncode})\n{daemon.tail()}")
    calls = {name: count - before.get(name, 0) for name, count in after.items()}
    per_second = {
        name: count / seconds
        for name, count in sorted(calls.items(), key=lambda item: -item[1])
        if count > 0
    }
    said = ", ".join(f"{name} {rate:.2f}" for name, rate in per_second.items())
    bench.note(
        f"idle: one daemon (100 slots) with nothing to do, its commands counted over "
        f"{seconds:g} s from {IDLE_WARMUP:g} s after it was ready; per command, per s: {said}"
    )
    total = math.fsum(per_second.values())
    return [Figure("Redis commands", "per s", total)]
