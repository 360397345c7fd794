"""The connection to Redis: pools, the gated cluster client, timeouts, and what failures mean."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from taskd.store.keys import Keys

# Connections shared by intake requests, claims, acks and heartbeats. Every caller waits
# for a free one rather than opening more, so connections stay few however many jobs run:
# claims and acks are batched, so a handful carries a daemon's whole traffic.
POOL_SIZE = 8
# Seconds a command may take before it counts as failed; a hung Redis must not hang
# intake requests forever. Blocking fetches get their own wait on top.
COMMAND_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

# Which parser reads Redis's replies: hiredis (C) when installed, else redis-py's own.
REPLY_PARSER = "hiredis" if HIREDIS_AVAILABLE else "python"


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """One installation's way into Redis, which a Store and an Inspector share.

    `client` is the shared pool of short commands; `blocking` holds the connections that
    wait (blocking fetches, the pub/sub subscription), so they never starve the others.
    """

    client: aioredis.Redis
    blocking: aioredis.Redis
    keys: Keys
    cluster: bool = False

    async def close(self) -> None:
        await self.client.aclose()
        await self.blocking.aclose()

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.client.ping()


def open(
    url: str,
    *,
    prefix: str,
    blocking_connections: int = 1,
    block_timeout: float = 5.0,
    cluster: bool = False,
) -> Connection:
    """Connect lazily: one shared pool, and one for connections that wait (fetch, pub/sub).

    With `cluster`, `url` names one node of a Redis Cluster: every script and blocking
    command touches keys of one queue (one hash tag, so one slot), and the client sends
    each to the node that serves it.
    """
    if cluster:
        return Connection(
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
    # A blocking fetch holds its connection while it waits, so fetches get their own pool
    # and can never starve acks and intake of connections.
    blocking = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max(1, blocking_connections),
        socket_timeout=block_timeout + COMMAND_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
    )
    return Connection(
        client=aioredis.Redis.from_pool(shared),
        blocking=aioredis.Redis.from_pool(blocking),
        keys=Keys(prefix),
    )


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


@contextmanager
def server_probe(url: str, timeout: float = 1.0) -> Iterator[Callable[[], int | None]]:
    """A blocking probe of one Redis server, for code that starts one (embedded.py): each
    call answers the server's process id, or None while it does not answer or still loads
    its data. One attempt per call: the caller does the retrying, against its deadline."""
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )

    def process_id() -> int | None:
        try:
            client.ping()  # BusyLoadingError while the AOF loads
            info = client.info("server")
        except redis.RedisError:
            return None
        pid = info.get("process_id")
        return pid if isinstance(pid, int) else None

    with client:
        yield process_id


def text(value: Any) -> str:
    """A reply as text: redis-py gives bytes, as we do not ask it to decode."""
    return value.decode() if isinstance(value, bytes) else str(value)
