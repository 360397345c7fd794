"""The store: the only code that talks to Redis, one typed method per operation."""

from __future__ import annotations

import heapq
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import anyio
import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster

from taskd.config import HandlerConfig
from taskd.jobs import ACTIVE, FINAL_STATES, QUEUED, Job
from taskd.keys import Keys

logger = logging.getLogger(__name__)

# Connections shared by intake requests, claims, acks and heartbeats. Every caller waits
# for a free one rather than opening more, so connections stay few however many jobs run:
# claims and acks are batched, so a handful carries a daemon's whole traffic.
POOL_SIZE = 8
# Ids moved per script call by requeue, recover, promote and trim: bounds how long one
# script blocks Redis.
BATCH = 500
# Seconds a command may take before it counts as failed; a hung Redis must not hang
# intake requests forever. Blocking fetches get their own wait on top.
COMMAND_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
# Most ids a listing examines per request when filters skip most of them.
LIST_SCAN_BUDGET = 2000
# How long an idempotency key holds by default, ms ([server] idempotency_ttl).
DEDUP_TTL_MS = 86_400_000
# Jobs sent per script call by enqueue_many: bounds how long one call blocks Redis.
ENQUEUE_CHUNK = 1000
# Recent wait and run times kept per queue, for the percentiles /stats shows.
TIMING_SAMPLES = 1000
# Throughput is counted in buckets of this many ms, and kept for THROUGHPUT_KEEP_MS.
BUCKET_MS = 10_000
THROUGHPUT_KEEP_MS = 600_000

# The counters of a queue's totals hash, which the scripts count up; /stats shows each,
# at 0 until its first event.
TOTALS = (
    "enqueued", "completed", "retried", "failed", "cancelled", "recovered",
    "callbacks_sent", "callbacks_failed", "rate_limited", "concurrency_limited",
)  # fmt: skip


def is_full(exc: BaseException) -> bool:
    """Whether Redis refused a write for being full (maxmemory reached, no eviction): it
    answers, but takes no writes until memory is freed. Refused inside a script, the
    refusal comes as the script's error, with Redis's OOM text in it."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and "-OOM " in str(exc)


# What a caller can catch to tell "Redis is unreachable" from a bug.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    # A Redis Cluster that is failing over, or misses a node for some slots.
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt ended, as the ack script records it."""

    job_id: str
    attempt: int
    outcome: str  # "completed", "retry", "failed" or "cancelled"
    value: bytes | str  # the result as JSON, or the error text
    retry_at: int = 0  # epoch ms, for "retry"
    history: bytes = b"{}"  # the history entry, a JSON object


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim gave: the jobs to run, and what the fetcher should do next."""

    jobs: list[Job]
    paused: bool = False
    more: bool = False  # ready jobs are left that the claim did not look at: claim again
    due: int | None = None  # when the first job put back for its rate limit is due
    rate_limited: int = 0  # jobs it put back for their rate_limit
    held: int = 0  # jobs it held for their global_concurrency
    # Ready jobs it left where they were: no handler here, or no free slot of the handler's
    # concurrency. Claiming again at once would find them again.
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """A job type's limits across all daemons, as claims enforce them (0: none)."""

    job_type: str
    concurrency: int = 0
    rate_count: int = 0
    rate_per_ms: int = 0


def limits_of(job_type: str, config: HandlerConfig) -> Limits:
    """A handler's limits across daemons, as claims enforce them."""
    rate = config.rate_limit
    return Limits(
        job_type,
        concurrency=config.global_concurrency or 0,
        rate_count=rate.count if rate else 0,
        rate_per_ms=rate.per_ms if rate else 0,
    )


@dataclass(frozen=True, slots=True)
class DaemonInfo:
    """A registered daemon as /stats shows it."""

    id: str
    host: str
    pid: int
    started_at: int
    concurrency: int
    queues: tuple[str, ...]
    active: int
    last_heartbeat: int
    types: tuple[str, ...] = ()  # the job types it has handlers for


@dataclass(frozen=True, slots=True, kw_only=True)
class Beat:
    """What a heartbeat found: whether the daemon was still registered, and whether the
    installation's marker was there (see beat.lua)."""

    registered: bool
    marked: bool


@dataclass(frozen=True, slots=True)
class Unhandled:
    """A ready job of a type that a claim found no handler for in its daemon."""

    job_type: str
    job_id: str  # the first such job that claim passed
    due: int  # when that job became due, epoch ms


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a job listing; `cursor` continues it (None: nothing more)."""

    jobs: list[Job]
    cursor: str | None


def _load_script(client: aioredis.Redis, name: str) -> Any:
    lua = resources.files("taskd").joinpath("lua")
    # lib.lua goes first: Redis 6.2 scripts cannot include one another.
    source = lua.joinpath("lib.lua").read_text() + lua.joinpath(f"{name}.lua").read_text()
    # register_script runs EVALSHA and reloads the script by itself after NOSCRIPT
    # (a restarted or flushed Redis), so the script text crosses the wire once.
    return client.register_script(source)


_SCRIPTS = (
    "enqueue", "claim", "ack", "requeue", "promote", "cancel", "retry", "delete",
    "recover", "trim", "beat", "forget", "progress", "schedule", "take_callbacks",
    "callback_done", "free_held", "forget_queue",
)  # fmt: skip


class Store:
    """Typed Redis operations of one taskd installation (one key prefix)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        blocking: aioredis.Redis,
        keys: Keys,
        cluster: bool = False,
    ) -> None:
        self._r = client
        self._blocking = blocking
        self.keys = keys
        self._cluster = cluster
        self._lua = {name: _load_script(client, name) for name in _SCRIPTS}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        blocking_connections: int = 1,
        block_timeout: float = 5.0,
        cluster: bool = False,
    ) -> Store:
        """Connect lazily: one shared pool, and one for connections that wait (fetch, pub/sub).

        With `cluster`, `url` names one node of a Redis Cluster: every script and blocking
        command touches keys of one queue (one hash tag, so one slot), and the client
        sends each to the node that serves it.
        """
        if cluster:
            return cls(
                client=_cluster_client(url, POOL_SIZE, COMMAND_TIMEOUT, gated=True),
                blocking=_cluster_client(
                    url, blocking_connections + 1, block_timeout + COMMAND_TIMEOUT, gated=False
                ),
                keys=Keys(prefix),
                cluster=True,
            )
        shared = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        # A blocking fetch holds its connection while it waits, so fetches get their own
        # pool and can never starve acks and intake of connections.
        blocking = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max(1, blocking_connections),
            socket_timeout=block_timeout + COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        return cls(
            client=aioredis.Redis.from_pool(shared),
            blocking=aioredis.Redis.from_pool(blocking),
            keys=Keys(prefix),
        )

    async def close(self) -> None:
        await self._r.aclose()
        await self._blocking.aclose()

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self._r.ping()

    async def check_writable(self) -> None:
        """Raise unless Redis answers and takes writes: one key with a second to live, so
        that a full Redis (which still answers PING) shows too (see is_full)."""
        await self._r.set(self.keys.health_probe, b"1", px=1000)

    # Submitting and reading jobs.

    async def enqueue(self, job: Job, dedup_ttl_ms: int = DEDUP_TTL_MS) -> str:
        """Store a new job, queued or (with `run_at`) scheduled.

        Returns the id of the job that holds the submission: the job's own, or that of an
        earlier job with the same idempotency key (then nothing was added).
        """
        [holder] = await self._enqueue_call(job.queue, job.created_at, [job], dedup_ttl_ms)
        return holder

    async def enqueue_many(
        self, jobs: Sequence[Job], dedup_ttl_ms: int = DEDUP_TTL_MS
    ) -> list[str]:
        """Store many new jobs in few round trips: one script call per queue and chunk.

        Each call is atomic; the batch as a whole is not, but every job in it has a fresh
        id, so a client retries a failed batch whole, with new ids (or idempotency keys).
        Returns the holders' ids in the order of `jobs`, as `enqueue` does.
        """
        groups: dict[tuple[str, int], list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault((job.queue, job.created_at), []).append(index)
        holders = [""] * len(jobs)
        for (queue, created_at), indexes in groups.items():
            for start in range(0, len(indexes), ENQUEUE_CHUNK):
                chunk = indexes[start : start + ENQUEUE_CHUNK]
                answered = await self._enqueue_call(
                    queue, created_at, [jobs[i] for i in chunk], dedup_ttl_ms
                )
                for index, holder in zip(chunk, answered, strict=True):
                    holders[index] = holder
        return holders

    async def _enqueue_call(
        self, queue: str, created_at: int, jobs: Sequence[Job], dedup_ttl_ms: int
    ) -> list[str]:
        k = self.keys
        args: list[Any] = [k.job_prefix(queue), queue, created_at]
        args += [k.idempotency_prefix(queue), dedup_ttl_ms]
        for job in jobs:
            payload = orjson.dumps(job.payload)
            args += [job.id, job.type, payload, job.max_attempts, job.run_at or 0]
            args += [job.idempotency_key or "", job.callback_url or "", job.priority]
        keys = [k.ready(queue), k.scheduled(queue), k.index(queue), k.totals(queue)]
        return [_text(holder) for holder in await self._lua["enqueue"](keys=keys, args=args)]

    async def get_job(self, job_id: str, queues: Iterable[str]) -> Job | None:
        """The job with this id in any of these queues, or None."""
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hgetall(self.keys.job(queue, job_id))
            found: list[dict[bytes, bytes]] = await pipe.execute()
        for fields in found:
            if fields:
                return Job.from_fields(fields)
        return None

    # Running jobs.

    async def claim(
        self,
        queue: str,
        daemon_id: str,
        limit: int,
        now: int,
        limits: Sequence[Limits],
        free: Mapping[str, int] | None = None,
    ) -> Claimed:
        """Move up to `limit` ready jobs, highest priority first, into this daemon's active
        set and return them: only jobs of the types in `limits` (those this daemon has a
        handler for), at most `free[type]` of a type (absent: no local cap). Jobs over
        their type's global `limits` wait; the others stay ready (see claim.lua)."""
        k = self.keys
        free = free or {}
        keys = [k.ready(queue), k.landing(queue, daemon_id), k.active(queue, daemon_id)]
        keys += [k.owners(queue), k.paused(queue), k.waits(queue), k.scheduled(queue)]
        keys += [k.totals(queue), k.limit_waits(queue), k.unhandled(queue)]
        args: list[Any] = [limit, now, k.job_prefix(queue), daemon_id, TIMING_SAMPLES]
        args.append(k.limit_prefix(queue))
        for spec in limits:
            args += [spec.job_type, free.get(spec.job_type, -1), spec.concurrency]
            args += [spec.rate_count, spec.rate_per_ms]
        reply = await self._lua["claim"](keys=keys, args=args)
        status, due, rate_limited, held, skipped, *flat = reply
        if status == b"paused":
            return Claimed([], paused=True)
        return Claimed(
            self._claimed_jobs(queue, daemon_id, flat),
            more=status == b"more",
            due=int(due) or None,
            rate_limited=int(rate_limited),
            held=int(held),
            skipped=int(skipped),
        )

    def _claimed_jobs(self, queue: str, daemon_id: str, flat: list[Any]) -> list[Job]:
        return [
            Job(
                id=flat[i].decode(),
                type=flat[i + 1].decode(),
                queue=queue,
                payload=orjson.loads(flat[i + 2]),
                state=ACTIVE,
                attempts=int(flat[i + 3]),
                created_at=int(flat[i + 4]),
                max_attempts=int(flat[i + 5]),
                started_at=int(flat[i + 6]),
                daemon=daemon_id,
                waited_ms=int(flat[i + 7]),
                callback_url=_text(flat[i + 8]) or None,
            )
            for i in range(0, len(flat), 9)
        ]

    async def wait_for_job(self, queue: str, daemon_id: str, block_seconds: int) -> bool:
        """Block until a job is ready, moving its id into this daemon's landing list.

        The id is then taken by the next `claim`. Blocking only happens when the queue is
        empty, and it returns the moment a job arrives: no polling on the pick-up path.
        """
        k = self.keys
        moved = await self._blocking.blmove(
            k.ready(queue), k.landing(queue, daemon_id), block_seconds, "RIGHT", "LEFT"
        )
        return moved is not None

    async def ack(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], now: int
    ) -> list[bool]:
        """Record finished attempts of one queue in one script call; returns, for each,
        whether it was recorded (False: it was no longer this daemon's)."""
        k = self.keys
        args: list[Any] = [now, k.job_prefix(queue), now // BUCKET_MS, TIMING_SAMPLES]
        args.append(k.limit_prefix(queue))
        for a in attempts:
            args += [a.job_id, a.attempt, a.outcome, a.value, a.retry_at, a.history]
        keys = [
            k.active(queue, daemon_id),
            k.completed(queue),
            k.dead(queue),
            k.scheduled(queue),
            k.cancelled(queue),
            k.totals(queue),
            k.throughput(queue),
            k.runs(queue),
            k.ready(queue),
            k.callbacks(queue),
        ]
        return [bool(flag) for flag in await self._lua["ack"](keys=keys, args=args)]

    async def report_progress(
        self, job: Job, daemon_id: str, value: float, message: str, now: int
    ) -> bool:
        """Record a running attempt's progress; False if the attempt is no longer ours."""
        k = self.keys
        keys = [k.active(job.queue, daemon_id), k.job(job.queue, job.id)]
        args = [job.id, job.attempts, repr(value), message, now]
        return bool(await self._lua["progress"](keys=keys, args=args))

    async def still_owned(self, queue: str, daemon_id: str, job_ids: Sequence[str]) -> set[str]:
        """Which of these ids are still in this daemon's active set."""
        if not job_ids:
            return set()
        scores = await self._r.zmscore(self.keys.active(queue, daemon_id), list(job_ids))
        return {job_id for job_id, score in zip(job_ids, scores, strict=True) if score is not None}

    async def requeue_inflight(self, queue: str, daemon_id: str, now: int) -> int:
        """Return all of a daemon's unfinished jobs of one queue to the ready list."""
        keys, args = self._requeue_call(queue, daemon_id, now)
        total = 0
        while moved := int(await self._lua["requeue"](keys=keys, args=args)):
            total += moved
        return total

    async def claimed_before(self, queue: str, daemon_id: str, before: int) -> list[str]:
        """Ids in a daemon's active set that it claimed before `before` (epoch ms)."""
        ids = await self._r.zrangebyscore(self.keys.active(queue, daemon_id), "-inf", f"({before}")
        return [_text(job_id) for job_id in ids]

    async def requeue(self, queue: str, daemon_id: str, job_ids: Sequence[str], now: int) -> int:
        """Return these ids, if still in the daemon's active set, to the ready list."""
        keys, args = self._requeue_call(queue, daemon_id, now)
        return int(await self._lua["requeue"](keys=keys, args=[*args, *job_ids]))

    def _requeue_call(self, queue: str, daemon_id: str, now: int) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [k.ready(queue), k.landing(queue, daemon_id), k.active(queue, daemon_id)]
        keys += [k.cancelled(queue), k.totals(queue), k.callbacks(queue)]
        return keys, [k.job_prefix(queue), BATCH, now, k.limit_prefix(queue)]

    async def promote(self, queue: str, now: int) -> tuple[int, int | None]:
        """Move due jobs to the ready list; returns (moved, when the next one is due)."""
        k = self.keys
        moved, due = await self._lua["promote"](
            keys=[k.scheduled(queue), k.ready(queue)], args=[now, BATCH, k.job_prefix(queue)]
        )
        return int(moved), (None if int(due) < 0 else int(due))

    # Callbacks.

    async def take_callbacks(self, queue: str, daemon_id: str, most: int, now: int) -> list[str]:
        """Move up to `most` ids from the queue's callback outbox into this daemon's
        callbacks in flight, and return them."""
        k = self.keys
        keys = [k.callbacks(queue), k.sending(queue, daemon_id), k.owners(queue)]
        ids = await self._lua["take_callbacks"](keys=keys, args=[most, now, daemon_id])
        return [_text(job_id) for job_id in ids]

    async def sending_before(self, queue: str, daemon_id: str, before: int) -> list[str]:
        """Callbacks in a daemon's set in flight that it took before `before` (epoch ms)."""
        ids = await self._r.zrangebyscore(self.keys.sending(queue, daemon_id), "-inf", f"({before}")
        return [_text(job_id) for job_id in ids]

    async def callback_done(self, queue: str, daemon_id: str, job_id: str, outcome: str) -> bool:
        """End a callback in flight: 'sent', 'failed' (both counted), 'dropped' (its job is
        gone) or 'returned' to the outbox; False if it was no longer this daemon's."""
        k = self.keys
        keys = [k.sending(queue, daemon_id), k.totals(queue), k.callbacks(queue)]
        return bool(await self._lua["callback_done"](keys=keys, args=[job_id, outcome]))

    # Recurring schedules.

    async def schedule_run(self, queue: str, name: str) -> tuple[int, str | None] | None:
        """The latest tick a schedule fired or skipped, and the job it made; None if never."""
        tick, job_id = await self._r.hmget(
            self.keys.schedules(queue), [f"{name}:tick", f"{name}:job"]
        )
        if tick is None:
            return None
        return int(tick), (_text(job_id) or None) if job_id is not None else None

    async def record_schedule_run(self, queue: str, name: str, tick: int, job_id: str) -> bool:
        keys = [self.keys.schedules(queue)]
        return bool(await self._lua["schedule"](keys=keys, args=[name, tick, job_id]))

    # Pausing queues.

    async def pause(self, queue: str) -> None:
        await self._r.set(self.keys.paused(queue), 1)

    async def resume(self, queue: str) -> None:
        await self._r.delete(self.keys.paused(queue))

    # Acting on one job.

    async def cancel(self, queue: str, job_id: str, now: int) -> str:
        """Cancel a job; returns its state before (see cancel.lua)."""
        k = self.keys
        keys = [k.job(queue, job_id), k.ready(queue), k.scheduled(queue)]
        keys += [k.cancelled(queue), k.totals(queue), k.callbacks(queue)]
        args = [job_id, now, k.cancel_channel, k.limit_prefix(queue)]
        state = await self._lua["cancel"](keys=keys, args=args)
        return _text(state)

    async def retry(self, queue: str, job_id: str, now: int) -> str:
        """Put a failed job back on its queue; returns its state before (see retry.lua)."""
        k = self.keys
        keys = [k.job(queue, job_id), k.dead(queue), k.ready(queue)]
        return _text(await self._lua["retry"](keys=keys, args=[job_id, now]))

    async def delete(self, queue: str, job_id: str) -> str:
        """Delete a job that is not running; returns its state before (see delete.lua)."""
        k = self.keys
        keys = [k.job(queue, job_id), k.ready(queue), k.scheduled(queue), k.completed(queue)]
        keys += [k.dead(queue), k.cancelled(queue), k.index(queue)]
        return _text(await self._lua["delete"](keys=keys, args=[job_id, k.limit_prefix(queue)]))

    @asynccontextmanager
    async def cancel_requests(self) -> AsyncIterator[AsyncIterator[str]]:
        """Subscribe to cancel requests; yields an iterator of job ids as they arrive."""
        if self._cluster:
            # Its pub/sub finds the node of the channel from the slot map, which the
            # cluster client reads at its first command: read it now.
            await cast(RedisCluster, self._blocking).initialize()
        pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.cancel_channel)
            yield _messages(pubsub)
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2

    # Recovering the jobs of dead daemons, and expiring finished ones.

    async def stale_owners(self, queue: str, before: int) -> list[str]:
        """Daemons whose lease on this queue was last renewed before `before`."""
        ids = await self._r.zrangebyscore(self.keys.owners(queue), "-inf", f"({before}")
        return [_text(daemon_id) for daemon_id in ids]

    async def recover(self, queue: str, daemon_id: str, now: int, before: int) -> int:
        """Take back all jobs (and callbacks in flight) of a daemon whose lease lapsed;
        returns how many jobs, or -1 if its lease is alive."""
        k = self.keys
        keys = [k.owners(queue), k.ready(queue), k.landing(queue, daemon_id)]
        keys += [k.active(queue, daemon_id), k.dead(queue), k.cancelled(queue), k.totals(queue)]
        keys += [k.callbacks(queue), k.sending(queue, daemon_id)]
        args = [daemon_id, now, before, k.job_prefix(queue), BATCH, k.limit_prefix(queue)]
        total = 0
        while True:
            jobs, callbacks = await self._lua["recover"](keys=keys, args=args)
            if jobs < 0:
                return -1 if total == 0 else total
            if jobs == callbacks == 0:
                return total
            total += jobs

    async def trim(self, queue: str, state: str, cutoff: int) -> int:
        """Delete jobs of a final state that finished at or before `cutoff`."""
        k = self.keys
        keys = [k.finished(queue, state), k.index(queue)]
        total = 0
        while deleted := int(
            await self._lua["trim"](keys=keys, args=[cutoff, BATCH, k.job_prefix(queue)])
        ):
            total += deleted
        return total

    # Daemons.

    async def beat(self, info: DaemonInfo) -> Beat:
        """Write a daemon's record and heartbeat (see beat.lua)."""
        fields: list[Any] = [
            "id", info.id, "host", info.host, "pid", info.pid, "started_at", info.started_at,
            "concurrency", info.concurrency, "queues", orjson.dumps(list(info.queues)),
            "types", orjson.dumps(list(info.types)),
            "active", info.active, "last_heartbeat", info.last_heartbeat,
        ]  # fmt: skip
        k = self.keys
        known, marked = await self._lua["beat"](
            keys=[k.daemons, k.daemon(info.id), k.marker],
            args=[info.id, info.last_heartbeat, *fields],
        )
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in info.queues:
                pipe.zadd(k.owners(queue), {info.id: info.last_heartbeat})
            pipe.sadd(k.queues, *info.queues)
            await pipe.execute()
        return Beat(registered=bool(known), marked=bool(marked))

    async def deregister_daemon(self, daemon_id: str, queues: Sequence[str]) -> None:
        """Remove a daemon that stopped cleanly (its in-flight keys are already empty)."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.daemon(daemon_id))
            pipe.zrem(self.keys.daemons, daemon_id)
            await pipe.execute()
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zrem(self.keys.owners(queue), daemon_id)
            await pipe.execute()

    async def stale_daemons(self, before: int) -> list[str]:
        ids = await self._r.zrangebyscore(self.keys.daemons, "-inf", f"({before}")
        return [_text(daemon_id) for daemon_id in ids]

    async def forget_daemon(self, daemon_id: str, before: int) -> bool:
        """Remove a dead daemon's record, unless it beat again since `before`."""
        k = self.keys
        keys = [k.daemons, k.daemon(daemon_id)]
        return bool(await self._lua["forget"](keys=keys, args=[daemon_id, before]))

    async def add_queues(self, queues: Iterable[str]) -> None:
        """Remember queue names, so that /stats, lookups and reapers know them."""
        names = list(queues)
        if names:
            await self._r.sadd(self.keys.queues, *names)

    async def forget_queue(self, queue: str) -> tuple[int, int, int]:
        """Forget a queue that holds nothing (see forget_queue.lua); returns what it still
        holds, (jobs, leases, callbacks), all 0 when it was forgotten."""
        k = self.keys
        keys = [k.index(queue), k.owners(queue), k.callbacks(queue), *k.queue_state(queue)]
        jobs, leases, callbacks = await self._lua["forget_queue"](keys=keys, args=[])
        if jobs == leases == callbacks == 0:
            await self._r.srem(k.queues, queue)
        return int(jobs), int(leases), int(callbacks)

    async def known_queues(self) -> set[str]:
        return {_text(name) for name in await self._r.smembers(self.keys.queues)}

    async def live_daemons(self, since: int) -> list[DaemonInfo]:
        """Daemons whose last heartbeat is at or after `since` (epoch ms)."""
        ids = await self._r.zrangebyscore(self.keys.daemons, since, "+inf")
        async with self._r.pipeline(transaction=False) as pipe:
            for daemon_id in ids:
                pipe.hgetall(self.keys.daemon(_text(daemon_id)))
            records: list[dict[bytes, bytes]] = await pipe.execute()
        return [_daemon_from_fields(fields) for fields in records if fields]

    async def in_flight(self, daemons: Sequence[DaemonInfo]) -> dict[str, int]:
        """Per daemon, the jobs its active sets hold now (claimed, running or being acked):
        live, where DaemonInfo.active is as of its last heartbeat."""
        async with self._r.pipeline(transaction=False) as pipe:
            for daemon in daemons:
                for queue in daemon.queues:
                    pipe.zcard(self.keys.active(queue, daemon.id))
            replies = iter(await pipe.execute())
        return {daemon.id: sum(next(replies) for _ in daemon.queues) for daemon in daemons}

    async def unhandled(self, queues: Sequence[str]) -> dict[str, list[Unhandled]]:
        """Per queue, the job types claims found ready with no handler in their daemon,
        each with the first job passed, while that job is still queued."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hgetall(k.unhandled(queue))
            noted: list[dict[bytes, bytes]] = await pipe.execute()
        found = [
            (queue, Unhandled(_text(kind), job_id, int(due)))
            for queue, fields in zip(queues, noted, strict=True)
            for kind, value in fields.items()
            for job_id, due in [_text(value).split(" ")]
        ]
        async with self._r.pipeline(transaction=False) as pipe:
            for queue, entry in found:
                pipe.hget(k.job(queue, entry.job_id), "state")
            states = await pipe.execute()
        result: dict[str, list[Unhandled]] = {queue: [] for queue in queues}
        for (queue, entry), state in zip(found, states, strict=True):
            if state == QUEUED.encode():
                result[queue].append(entry)
        return result

    # Statistics and listings.

    async def queue_counts(self, queues: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per queue, how many jobs are in each state now, the totals since the start, and
        the callbacks waiting in its outbox."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zrange(k.owners(queue), 0, -1)
            owners: list[list[bytes]] = await pipe.execute()
        async with self._r.pipeline(transaction=False) as pipe:
            for queue, holders in zip(queues, owners, strict=True):
                for ready in k.ready_lists(queue):
                    pipe.llen(ready)
                pipe.zcard(k.scheduled(queue))
                for state in FINAL_STATES:
                    pipe.zcard(k.finished(queue, state))
                pipe.hgetall(k.totals(queue))
                pipe.llen(k.callbacks(queue))
                for holder in holders:
                    pipe.zcard(k.active(queue, _text(holder)))
            replies = iter(await pipe.execute())
        counts: dict[str, dict[str, Any]] = {}
        for queue, holders in zip(queues, owners, strict=True):
            queued = sum(next(replies) for _ in k.ready_lists(queue))
            scheduled, completed, failed, cancelled, totals, callbacks = (
                next(replies) for _ in range(6)
            )
            active = sum(next(replies) for _ in holders)
            counts[queue] = {
                "queued": queued,
                "scheduled": scheduled,
                "active": active,
                "completed": completed,
                "failed": failed,
                "cancelled": cancelled,
                "totals": {
                    **dict.fromkeys(TOTALS, 0),
                    **{_text(name): int(value) for name, value in totals.items()},
                },
                "callbacks_pending": callbacks,
            }
        return counts

    async def queue_activity(self, queues: Sequence[str], now: int) -> dict[str, dict[str, Any]]:
        """Per queue: paused or not, throughput over 1 and 5 minutes, wait and run times.

        Everything is read from bounded structures (a flag, 30 buckets, two capped lists),
        so the cost does not grow with the number of jobs stored.
        """
        k = self.keys
        buckets = [now // BUCKET_MS - n for n in range(1, 31)]  # the 5 full minutes before now
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.exists(k.paused(queue))
                pipe.hmget(k.throughput(queue), buckets)
                pipe.lrange(k.waits(queue), 0, -1)
                pipe.lrange(k.runs(queue), 0, -1)
            replies = iter(await pipe.execute())
        activity: dict[str, dict[str, Any]] = {}
        for queue in queues:
            paused, counts, waits, runs = (next(replies) for _ in range(4))
            done = [int(c) if c else 0 for c in counts]
            activity[queue] = {
                "paused": bool(paused),
                "throughput": {"1m": sum(done[:6]) / 60, "5m": sum(done) / 300},
                "wait_ms": percentiles(waits),
                "run_ms": percentiles(runs),
            }
        return activity

    async def limit_status(
        self, queue: str, limits: Sequence[Limits], now: int
    ) -> dict[str, dict[str, int]]:
        """Per limited job type of a queue: jobs running under its global_concurrency and
        held for it, starts in the current rate window, and the waits counted so far."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for spec in limits:
                pipe.zcard(k.limit(queue, spec.job_type, "running"))
                pipe.zcard(k.limit(queue, spec.job_type, "line"))
                # As claim.lua counts it: a start at exactly now - window has left the window.
                starts = k.limit(queue, spec.job_type, "starts")
                pipe.zcount(starts, f"({now - spec.rate_per_ms}", "+inf")
                fields = [f"{spec.job_type}:{why}" for why in ("rate_limit", "concurrency")]
                pipe.hmget(k.limit_waits(queue), fields)
            replies = iter(await pipe.execute())
        status: dict[str, dict[str, int]] = {}
        for spec in limits:
            running, held, started, (rate_waits, concurrency_waits) = (
                next(replies) for _ in range(4)
            )
            status[spec.job_type] = {
                "running": running,
                "held": held,
                "started_in_window": started if spec.rate_count else 0,
                "rate_limited": int(rate_waits or 0),
                "concurrency_limited": int(concurrency_waits or 0),
            }
        return status

    async def free_held(self, queue: str, job_types: Sequence[str]) -> int:
        """Return to the ready jobs the held jobs of these types, which have no
        global_concurrency any more (see free_held.lua); how many."""
        if not job_types:
            return 0
        k = self.keys
        args = [k.job_prefix(queue), k.limit_prefix(queue), BATCH, *job_types]
        total = 0
        while freed := int(await self._lua["free_held"](keys=[k.ready(queue)], args=args)):
            total += freed
        return total

    async def trim_throughput(self, queue: str, now: int) -> None:
        """Forget throughput buckets older than THROUGHPUT_KEEP_MS."""
        key = self.keys.throughput(queue)
        oldest = (now - THROUGHPUT_KEEP_MS) // BUCKET_MS
        stale = [field for field in await self._r.hkeys(key) if int(field) < oldest]
        if stale:
            await self._r.hdel(key, *stale)

    async def server_info(self) -> dict[str, Any]:
        """Redis's version and memory use (of a cluster: the lowest version, all memory)."""
        if self._cluster:
            cluster = cast(RedisCluster, self._r)
            servers = await cluster.info("server", target_nodes=RedisCluster.PRIMARIES)
            memories = await cluster.info("memory", target_nodes=RedisCluster.PRIMARIES)
            return {
                "version": min(str(i.get("redis_version")) for i in _per_node(servers)),
                "used_memory": sum(int(i.get("used_memory", 0)) for i in _per_node(memories)),
                "nodes": len(_per_node(servers)),
            }
        info = await self._r.info("server")
        memory = await self._r.info("memory")
        return {"version": info.get("redis_version"), "used_memory": memory.get("used_memory")}

    async def list_jobs(
        self,
        queues: Sequence[str],
        *,
        state: str | None,
        job_type: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page:
        """Jobs newest first, filtered, one page at a time.

        Jobs of a final state come from that state's set, newest finished first; all
        others from the index, newest created first. Filters are applied to what is read,
        so a page can be short when few jobs match: its cursor then goes on scanning.
        """
        walk: _ByFinish | _ByCreation
        if state in FINAL_STATES:
            sets = [self.keys.finished(queue, state) for queue in queues]
            walk = _ByFinish(self._r, sets, cursor)
        else:
            walk = _ByCreation(self._r, [self.keys.index(queue) for queue in queues], cursor)
        jobs: list[Job] = []
        scanned = 0
        while len(jobs) < limit and scanned < LIST_SCAN_BUDGET:
            batch = await walk.next_ids(limit - len(jobs))
            if not batch:
                return Page(jobs, None)
            scanned += len(batch)
            for job in await self._jobs_by_id(queues, batch):
                if (state is None or job.state == state) and job_type in (None, job.type):
                    jobs.append(job)
        return Page(jobs, walk.cursor)

    async def _jobs_by_id(self, queues: Sequence[str], ids: list[tuple[str, str]]) -> list[Job]:
        async with self._r.pipeline(transaction=False) as pipe:
            for queue, job_id in ids:
                pipe.hgetall(self.keys.job(queue, job_id))
            records: list[dict[bytes, bytes]] = await pipe.execute()
        # A record can be gone (trimmed, deleted) between the two reads.
        return [Job.from_fields(fields) for fields in records if fields]


class _ByCreation:
    """Walks index sets (ids ordered as created) of several queues, newest first, merged."""

    def __init__(self, r: aioredis.Redis, index_keys: list[str], cursor: str | None) -> None:
        self._r = r
        self._keys = index_keys
        self.cursor = cursor

    async def next_ids(self, count: int) -> list[tuple[str, str]]:
        """The next `count` (queue, id) pairs after the cursor; the cursor moves past them."""
        start = f"({self.cursor}" if self.cursor else "+"
        async with self._r.pipeline(transaction=False) as pipe:
            for key in self._keys:
                pipe.zrevrangebylex(key, start, "-", 0, count)
            pages: list[list[bytes]] = await pipe.execute()
        merged = heapq.merge(
            *([(_text(i), n) for i in page] for n, page in enumerate(pages)), reverse=True
        )
        picked = [(self._keys[n], job_id) for job_id, n in list(merged)[:count]]
        if picked:
            self.cursor = picked[-1][1]
        return [(_queue_of(key), job_id) for key, job_id in picked]


class _ByFinish:
    """Walks final-state sets (scored by finish time) of several queues, newest first."""

    def __init__(self, r: aioredis.Redis, keys: list[str], cursor: str | None) -> None:
        self._r = r
        self._keys = keys
        self.cursor = cursor

    async def next_ids(self, count: int) -> list[tuple[str, str]]:
        after = _parse_finish_cursor(self.cursor)
        found: list[tuple[int, str, str]] = []
        for key in self._keys:
            found += [(score, job_id, key) for score, job_id in await self._page(key, after, count)]
        found.sort(reverse=True)
        picked = found[:count]
        if picked:
            self.cursor = f"{picked[-1][0]}-{picked[-1][1]}"
        return [(_queue_of(key), job_id) for _, job_id, key in picked]

    async def _page(
        self, key: str, after: tuple[int, str] | None, count: int
    ) -> list[tuple[int, str]]:
        """Up to `count` entries ordered before `after` by (finish time, id), descending."""
        top = str(after[0]) if after else "+inf"
        out: list[tuple[int, str]] = []
        offset = 0
        while len(out) < count:
            batch = await self._r.zrevrangebyscore(
                key, top, "-inf", start=offset, num=count, withscores=True
            )
            if not batch:
                break
            offset += len(batch)
            for member, raw_score in cast(list[tuple[bytes, float]], batch):
                score, job_id = int(raw_score), _text(member)
                # Many jobs finish in the same millisecond: within it, order by id.
                if after is None or (score, job_id) < after:
                    out.append((score, job_id))
        return out[:count]


async def _messages(pubsub: PubSub) -> AsyncIterator[str]:
    while True:
        # A bounded wait: an idle subscription must not trip the connection's read timeout.
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None and message["type"] == "message":
            yield _text(message["data"])


def percentiles(samples: Sequence[bytes | int]) -> dict[str, int | None]:
    """p50, p95 and p99 of samples (nearest rank); None each when there are none."""
    values = sorted(int(v) for v in samples)
    if not values:
        return {"p50": None, "p95": None, "p99": None}

    def rank(q: float) -> int:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99)}


def _parse_finish_cursor(cursor: str | None) -> tuple[int, str] | None:
    if not cursor:
        return None
    score, _, job_id = cursor.partition("-")
    return int(score), job_id


def _queue_of(key: str) -> str:
    """The queue named by a queue key's hash tag."""
    return key[key.index("{") + 1 : key.index("}")]


class _GatedCluster(RedisCluster):
    """A cluster client whose commands wait for one of a few turns.

    redis-py's cluster client raises when a node's connections run out instead of waiting
    for one, as the single-node pool does; the gate keeps callers waiting instead, so
    connections stay few however many requests arrive at once.
    """

    def __init__(self, *args: Any, turns: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = anyio.Semaphore(turns)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._turns:
            return await super().execute_command(*args, **kwargs)


def _cluster_client(url: str, turns: int, timeout: float, *, gated: bool) -> aioredis.Redis:
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        # Room for pipelines, which take connections beside the gated commands.
        "max_connections": turns * 4,
    }
    client = (
        _GatedCluster.from_url(url, turns=turns, **options)
        if gated
        else RedisCluster.from_url(url, **options)
    )
    # Typed as the single-node client: the store calls only commands both clients take
    # the same way, and tells the cluster apart where they differ (server_info).
    return cast(aioredis.Redis, client)


def _per_node(info: Any) -> list[dict[str, Any]]:
    """INFO answers of a cluster client, one per node, whatever shape it gives them in."""
    if isinstance(info, dict) and info and all(isinstance(v, dict) for v in info.values()):
        return list(info.values())
    return [info]


def _text(value: Any) -> str:
    """A reply as text: redis-py gives bytes, as we do not ask it to decode."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _daemon_from_fields(fields: dict[bytes, bytes]) -> DaemonInfo:
    f = {key.decode(): value for key, value in fields.items()}
    return DaemonInfo(
        id=f["id"].decode(),
        host=f["host"].decode(),
        pid=int(f["pid"]),
        started_at=int(f["started_at"]),
        concurrency=int(f["concurrency"]),
        queues=tuple(orjson.loads(f["queues"])),
        active=int(f["active"]),
        last_heartbeat=int(f["last_heartbeat"]),
        # Daemons of an older taskd do not say: taken as knowing none.
        types=tuple(orjson.loads(f["types"])) if "types" in f else (),
    )
