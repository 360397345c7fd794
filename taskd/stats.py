"""The /stats document: what every queue holds and does, and which daemons are alive."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from taskd.config import AutoscaleConfig, HandlerConfig
from taskd.jobs import format_ms
from taskd.sizing import Load, fleet_load, public, queue_load
from taskd.store import DaemonInfo, Inspector, Unhandled
from taskd.workers import type_limits_of


async def snapshot(
    inspector: Inspector,
    queues: Sequence[str],
    *,
    now: int,
    dead_after_ms: int,
    handler_configs: Mapping[str, HandlerConfig],
    autoscale: AutoscaleConfig | None = None,
) -> dict[str, Any]:
    """The same document from any daemon: it is read from Redis, not from local memory.

    Every read is of a bounded structure (counters, capped lists, set sizes), so the cost
    does not grow with the number of jobs stored.
    """
    daemons = await inspector.live_daemons(since=now - dead_after_ms)
    in_flight = await inspector.in_flight(daemons)
    counts = await inspector.queue_counts(queues)
    activity = await inspector.queue_activity(queues, now)
    limits = {queue: await _limits(inspector, queue, handler_configs, now) for queue in queues}
    stranded = no_handler(await inspector.unhandled(queues), daemons, now)
    backlog = await inspector.archive_backlog(queues)
    policy = autoscale or AutoscaleConfig()
    loads = await autoscale_loads(inspector, queues, counts, daemons, now, policy)
    return {
        "time": format_ms(now),
        "queues": {
            queue: {
                **counts[queue],
                **activity[queue],
                "limits": limits[queue],
                "no_handler": stranded[queue],
                "autoscale": public(loads[queue], policy),
            }
            for queue in queues
        },
        "instances": [_instance(daemon, in_flight[daemon.id], now) for daemon in daemons],
        "autoscale": public(fleet_load(list(loads.values()), daemons), policy, fleet=True),
        "archive": archive_backlog(backlog, now),
        "redis": await inspector.server_info(),
    }


async def autoscale_loads(
    inspector: Inspector,
    queues: Sequence[str],
    counts: Mapping[str, Mapping[str, Any]],
    daemons: Sequence[DaemonInfo],
    now: int,
    policy: AutoscaleConfig,
) -> dict[str, Load]:
    """Per queue, what it asks of the daemons (taskd.sizing), from its counts
    (Inspector.queue_counts) and its rates, read here."""
    rates = await inspector.queue_rates(queues, now)
    return {
        queue: queue_load(
            queued=counts[queue]["queued"],
            active=counts[queue]["active"],
            rates=rates[queue],
            serving=[d for d in daemons if queue in d.queues],
            live=daemons,
            target_drain_s=policy.target_drain_s,
        )
        for queue in queues
    }


def no_handler(
    unhandled: Mapping[str, Sequence[Unhandled]], daemons: Sequence[DaemonInfo], now: int
) -> dict[str, dict[str, Any]]:
    """Per queue, the ready job types that no live daemon serving it has a handler for
    (as each registers them), with the job a claim passed and how long it has waited."""
    return {
        queue: {
            entry.job_type: {"job": entry.job_id, "wait_ms": max(0, now - entry.due)}
            for entry in entries
            if not any(queue in d.queues and entry.job_type in d.types for d in daemons)
        }
        for queue, entries in unhandled.items()
    }


def archive_backlog(backlog: Mapping[str, tuple[int, int | None]], now: int) -> dict[str, Any]:
    """The jobs waiting in the archive hand-offs (Inspector.archive_backlog), all queues
    together: how many, and how long ago the oldest one ended (None: none waits)."""
    oldest = min((at for _, at in backlog.values() if at is not None), default=None)
    return {
        "pending": sum(count for count, _ in backlog.values()),
        "oldest_age_s": None if oldest is None else round(max(0, now - oldest) / 1000, 1),
    }


async def _limits(
    inspector: Inspector, queue: str, handler_configs: Mapping[str, HandlerConfig], now: int
) -> dict[str, Any]:
    """The limits of the job types whose handler serves this queue, and how they bite."""
    limited = {
        name: config
        for name, config in handler_configs.items()
        if config.queue == queue and (config.global_concurrency or config.rate_limit)
    }
    specs = [type_limits_of(name, config) for name, config in limited.items()]
    status = await inspector.limit_status(queue, specs, now)
    return {
        name: {
            "global_concurrency": config.global_concurrency,
            "rate_limit": str(config.rate_limit) if config.rate_limit else None,
            **status[name],
        }
        for name, config in limited.items()
    }


def _instance(daemon: DaemonInfo, active: int, now: int) -> dict[str, Any]:
    return {
        "id": daemon.id,
        "host": daemon.host,
        "pid": daemon.pid,
        "concurrency": daemon.concurrency,
        "active": active,
        "queues": list(daemon.queues),
        "types": list(daemon.types),
        "started_at": format_ms(daemon.started_at),
        "uptime_s": round((now - daemon.started_at) / 1000, 1),
        "last_heartbeat": format_ms(daemon.last_heartbeat),
        "heartbeat_age_ms": now - daemon.last_heartbeat,
    }
