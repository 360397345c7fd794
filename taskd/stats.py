"""The /stats document: what every queue holds and does, and which daemons are alive."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskd.jobs import format_ms
from taskd.store import DaemonInfo, Store


async def snapshot(
    store: Store, queues: Sequence[str], *, now: int, dead_after_ms: int
) -> dict[str, Any]:
    """The same document from any daemon: it is read from Redis, not from local memory.

    Every read is of a bounded structure (counters, capped lists, set sizes), so the cost
    does not grow with the number of jobs stored.
    """
    daemons = await store.live_daemons(since=now - dead_after_ms)
    counts = await store.queue_counts(queues)
    activity = await store.queue_activity(queues, now)
    return {
        "time": format_ms(now),
        "queues": {queue: {**counts[queue], **activity[queue]} for queue in queues},
        "instances": [_instance(daemon, now) for daemon in daemons],
        "redis": await store.server_info(),
    }


def _instance(daemon: DaemonInfo, now: int) -> dict[str, Any]:
    return {
        "id": daemon.id,
        "host": daemon.host,
        "pid": daemon.pid,
        "concurrency": daemon.concurrency,
        "active": daemon.active,
        "queues": list(daemon.queues),
        "started_at": format_ms(daemon.started_at),
        "uptime_s": round((now - daemon.started_at) / 1000, 1),
        "last_heartbeat": format_ms(daemon.last_heartbeat),
        "heartbeat_age_ms": now - daemon.last_heartbeat,
    }
