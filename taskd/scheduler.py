"""The scheduler enqueues the jobs of recurring schedules: one job per tick, however many
daemons run the same schedules."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import anyio
from croniter import croniter

from taskd.config import HandlerConfig, ScheduleConfig
from taskd.jobs import DEFAULT_PRIORITY, QUEUED, Job, format_ms, new_id, now_ms
from taskd.loop import Outage, repeat
from taskd.store import Inspector, Store

if TYPE_CHECKING:  # opentelemetry, which it imports, is the optional otel extra
    from taskd.tracing import Tracing

logger = logging.getLogger(__name__)

# A tick this much overdue was missed (every daemon was down); `catch_up` decides.
GRACE_MS = 60_000
# Longest sleep between passes (the next tick may be far; a Redis outage must heal).
MAX_SLEEP = 30.0
RETRY_DELAY = 1.0
# How long a tick's idempotency key holds: daemons firing the same tick within this make
# one job. Longer than any clock skew or restart between two daemons.
TICK_KEY_TTL_MS = 7 * 24 * 3600 * 1000


class Scheduler:
    """Fires each schedule's ticks as they come; all daemons may run one.

    A tick is fired as a submission whose idempotency key names the schedule and the
    tick, so the enqueue script lets exactly one job through whichever daemons fire it.
    With `tracing`, each tick fired starts a trace of its own, which its job's attempts
    join.
    """

    def __init__(
        self,
        *,
        store: Store,
        schedules: Sequence[ScheduleConfig],
        handler_configs: Mapping[str, HandlerConfig],
        clock: Callable[[], int] = now_ms,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing  # None: off
        self._store = store
        self.schedules = tuple(schedules)
        self._handler_configs = handler_configs
        self._clock = clock

    def queue_of(self, schedule: ScheduleConfig) -> str:
        return schedule.queue or self._handler_configs[schedule.type].queue

    async def describe(self, inspector: Inspector) -> list[dict[str, Any]]:
        """The /schedules view: each schedule with its next and last run, and the state
        of the last job it made."""
        return [await self._describe(schedule, inspector) for schedule in self.schedules]

    async def _describe(self, schedule: ScheduleConfig, inspector: Inspector) -> dict[str, Any]:
        queue = self.queue_of(schedule)
        last = await inspector.schedule_run(queue, schedule.name)
        job = await inspector.get_job(last[1], [queue]) if last and last[1] else None
        return {
            "name": schedule.name,
            "cron": schedule.cron,
            "timezone": schedule.timezone,
            "type": schedule.type,
            "queue": queue,
            "catch_up": schedule.catch_up,
            "next_run": format_ms(next_tick(schedule, self._clock())),
            "last_run": format_ms(last[0]) if last else None,
            "last_job": {"id": job.id, "state": job.state} if job else None,
        }

    async def tick(self) -> int | None:
        """Fire every due tick once; returns when the next tick falls (epoch ms)."""
        now = self._clock()
        for schedule in self.schedules:
            await self._fire_due(schedule, now)
        return min((next_tick(s, now) for s in self.schedules), default=None)

    async def run(self) -> None:
        """Fire ticks until cancelled."""
        outage = Outage("firing schedules", logger)
        await repeat(self._fire_then_wait, outage=outage, retry_delay=RETRY_DELAY)

    async def _fire_then_wait(self) -> None:
        next_due = await self.tick()
        wait = MAX_SLEEP if next_due is None else (next_due - self._clock()) / 1000
        await anyio.sleep(min(MAX_SLEEP, max(0.001, wait)))

    async def _fire_due(self, schedule: ScheduleConfig, now: int) -> None:
        due = prev_tick(schedule, now)
        queue = self.queue_of(schedule)
        last = await self._store.schedule_run(queue, schedule.name)
        if last is not None and last[0] >= due:
            return  # fired (or skipped) already
        missed = now - due > GRACE_MS
        if missed and (last is None or schedule.catch_up == "none"):
            # Down through the tick: no job for it, but remember it as handled.
            await self._store.record_schedule_run(queue, schedule.name, due, "")
            logger.info("schedule %s: tick %s missed; not caught up", schedule.name, due)
            return
        job_id = await self._fire(schedule, queue, due)
        await self._store.record_schedule_run(queue, schedule.name, due, job_id)

    async def _fire(self, schedule: ScheduleConfig, queue: str, tick: int) -> str:
        handler = self._handler_configs[schedule.type]
        job = Job(
            id=new_id(),
            type=schedule.type,
            queue=queue,
            payload=schedule.payload,
            state=QUEUED,
            attempts=0,
            created_at=self._clock(),
            max_attempts=handler.max_attempts,
            idempotency_key=f"schedule:{schedule.name}:{tick}",
            priority=DEFAULT_PRIORITY if schedule.priority is None else schedule.priority,
        )
        if self._tracing is None:
            holder = await self._store.enqueue(job, TICK_KEY_TTL_MS)
        else:
            with self._tracing.tick(job, schedule.name) as traced:
                holder = await self._store.enqueue(traced, TICK_KEY_TTL_MS)
        if holder == job.id:
            logger.info("schedule %s: enqueued job %s for tick %s", schedule.name, job.id, tick)
        return holder


def prev_tick(schedule: ScheduleConfig, now: int) -> int:
    """The latest tick at or before `now` (epoch ms)."""
    return _walk(schedule, now + 1, forward=False)


def next_tick(schedule: ScheduleConfig, now: int) -> int:
    """The first tick after `now` (epoch ms)."""
    return _walk(schedule, now, forward=True)


def _walk(schedule: ScheduleConfig, at: int, *, forward: bool) -> int:
    start = datetime.fromtimestamp(at / 1000, tz=UTC).astimezone(ZoneInfo(schedule.timezone))
    times = croniter(schedule.cron, start)
    moment: datetime = times.get_next(datetime) if forward else times.get_prev(datetime)
    return int(moment.timestamp() * 1000)
