"""The store: the only code that talks to Redis, one typed method per operation."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline

from taskd.jobs import ACTIVE, COMPLETED, FAILED, QUEUED, Job
from taskd.keys import Keys

logger = logging.getLogger(__name__)

# Connections shared by intake requests, claims, acks and heartbeats. Every caller waits
# for a free one rather than opening more, so connections stay few however many jobs run:
# claims and acks are batched, so a handful carries a daemon's whole traffic.
POOL_SIZE = 8
# Ids moved per requeue script call: bounds how long one script blocks Redis.
REQUEUE_BATCH = 500
# Seconds a command may take before it counts as failed; a hung Redis must not hang
# intake requests forever. Blocking fetches get their own wait on top.
COMMAND_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

# What a caller can catch to tell "Redis is unreachable" from a bug.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended: `value` is the result as JSON text, or the error text."""

    job_id: str
    completed: bool
    value: bytes | str


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


def _load_script(client: aioredis.Redis, name: str) -> Any:
    source = resources.files("taskd").joinpath("lua", f"{name}.lua").read_text()
    # register_script runs EVALSHA and reloads the script by itself after NOSCRIPT
    # (a restarted or flushed Redis), so the script text crosses the wire once.
    return client.register_script(source)


class Store:
    """Typed Redis operations of one taskd installation (one key prefix)."""

    def __init__(self, *, client: aioredis.Redis, blocking: aioredis.Redis, keys: Keys) -> None:
        self._r = client
        self._blocking = blocking
        self.keys = keys
        self._enqueue = _load_script(client, "enqueue")
        self._claim = _load_script(client, "claim")
        self._ack = _load_script(client, "ack")
        self._requeue = _load_script(client, "requeue")

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str, blocking_connections: int = 1, block_timeout: float = 5.0
    ) -> Store:
        """Connect lazily: one shared pool, and one pool for blocking fetches (one per queue)."""
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

    async def server_info(self) -> dict[str, Any]:
        """Redis's version and memory use."""
        info = await self._r.info("server")
        memory = await self._r.info("memory")
        return {
            "version": info.get("redis_version"),
            "used_memory": memory.get("used_memory"),
        }

    # Jobs.

    async def enqueue(self, job: Job) -> bool:
        """Store a new queued job; False when its id exists already."""
        k = self.keys
        added = await self._enqueue(
            keys=[k.job(job.queue, job.id), k.ready(job.queue)],
            args=[job.id, job.type, job.queue, orjson.dumps(job.payload), job.created_at],
        )
        return bool(added)

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

    async def claim(self, queue: str, daemon_id: str, limit: int, now: int) -> list[Job]:
        """Move up to `limit` ready jobs into this daemon's active set and return them."""
        k = self.keys
        flat = await self._claim(
            keys=[k.ready(queue), k.landing(queue, daemon_id), k.active(queue, daemon_id)],
            args=[limit, now, k.job_prefix(queue), daemon_id],
        )
        return [
            Job(
                id=flat[i].decode(),
                type=flat[i + 1].decode(),
                queue=queue,
                payload=orjson.loads(flat[i + 2]),
                state=ACTIVE,
                attempts=int(flat[i + 3]),
                created_at=int(flat[i + 4]),
                started_at=now,
                daemon=daemon_id,
            )
            for i in range(0, len(flat), 5)
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

    async def ack(self, queue: str, daemon_id: str, outcomes: Sequence[Outcome], now: int) -> int:
        """Record finished jobs of one queue in one script call; returns how many were ours."""
        k = self.keys
        args: list[Any] = [now, k.job_prefix(queue)]
        for outcome in outcomes:
            args += [outcome.job_id, COMPLETED if outcome.completed else FAILED, outcome.value]
        recorded = await self._ack(
            keys=[k.active(queue, daemon_id), k.completed(queue), k.failed(queue)], args=args
        )
        return int(recorded)

    async def requeue_inflight(self, queue: str, daemon_id: str) -> int:
        """Return all of a daemon's unfinished jobs of one queue to the ready list."""
        k = self.keys
        keys = [k.ready(queue), k.landing(queue, daemon_id), k.active(queue, daemon_id)]
        total = 0
        while moved := int(
            await self._requeue(keys=keys, args=[k.job_prefix(queue), REQUEUE_BATCH])
        ):
            total += moved
        return total

    # Daemons.

    async def register_daemon(self, info: DaemonInfo) -> None:
        """Add or refresh a daemon's record and its heartbeat time."""
        fields = {
            "id": info.id,
            "host": info.host,
            "pid": info.pid,
            "started_at": info.started_at,
            "concurrency": info.concurrency,
            "queues": orjson.dumps(list(info.queues)),
            "active": info.active,
            "last_heartbeat": info.last_heartbeat,
        }
        key = self.keys.daemon(info.id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.zadd(self.keys.daemons, {info.id: info.last_heartbeat})
            pipe.sadd(self.keys.queues, *info.queues)
            await pipe.execute()

    async def deregister_daemon(self, daemon_id: str) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.daemon(daemon_id))
            pipe.zrem(self.keys.daemons, daemon_id)
            await pipe.execute()

    async def add_queues(self, queues: Iterable[str]) -> None:
        """Remember queue names, so that /stats and job lookups know them."""
        names = list(queues)
        if names:
            await self._r.sadd(self.keys.queues, *names)

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

    async def queue_counts(
        self, queues: Sequence[str], daemons: Sequence[DaemonInfo]
    ) -> dict[str, dict[str, int]]:
        """Per queue, how many jobs are queued, active, completed and failed."""
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                self._count_queue(pipe, queue, daemons)
            replies = await pipe.execute()
        counts: dict[str, dict[str, int]] = {}
        at = 0
        for queue in queues:
            serving = sum(1 for d in daemons if queue in d.queues)
            queued, completed, failed = replies[at : at + 3]
            active = sum(replies[at + 3 : at + 3 + serving])
            at += 3 + serving
            counts[queue] = {QUEUED: queued, ACTIVE: active, COMPLETED: completed, FAILED: failed}
        return counts

    def _count_queue(self, pipe: Pipeline, queue: str, daemons: Sequence[DaemonInfo]) -> None:
        k = self.keys
        pipe.llen(k.ready(queue))
        pipe.zcard(k.completed(queue))
        pipe.zcard(k.failed(queue))
        for daemon in daemons:
            if queue in daemon.queues:
                pipe.zcard(k.active(queue, daemon.id))


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
    )
