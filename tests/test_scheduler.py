"""Recurring schedules: one job per tick across daemons, missed ticks, GET /schedules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import anyio
import pytest
from redis.asyncio import Redis

from taskd.config import ConfigError, HandlerConfig, ScheduleConfig, parse
from taskd.jobs import DEFAULT_PRIORITY, QUEUED
from taskd.scheduler import Scheduler, next_tick, prev_tick
from taskd.store import Keys, Store
from tests.builders import Clock
from tests.support import base_url, get_json, indexed_ids, running_daemon

K = Keys("taskd")
HANDLERS = {"echo": HandlerConfig(name="echo", kind="builtin", builtin="echo")}
EVERY_5 = ScheduleConfig(name="five", cron="*/5 * * * *", type="echo", payload={"n": 1})


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[list[Store]]:
    stores = [Store.from_url(redis_url, prefix="taskd") for _ in range(3)]
    yield stores
    for store in stores:
        await store.close()


def test_ticks_follow_the_cron_expression_in_its_time_zone() -> None:
    at = ms("2026-11-24T10:07:30+00:00")
    assert prev_tick(EVERY_5, at) == ms("2026-11-24T10:05:00+00:00")
    assert next_tick(EVERY_5, at) == ms("2026-11-24T10:10:00+00:00")
    assert prev_tick(EVERY_5, ms("2026-11-24T10:05:00+00:00")) == ms("2026-11-24T10:05:00+00:00")
    paris = ScheduleConfig(name="p", cron="0 9 * * *", timezone="Europe/Paris", type="echo")
    assert next_tick(paris, at) == ms("2026-11-25T09:00:00+01:00")


async def test_many_daemons_firing_one_tick_make_one_job(stores: list[Store], redis: Redis) -> None:
    clock = Clock(ms("2026-11-24T10:05:00.500+00:00"))
    schedulers = [
        Scheduler(store=s, schedules=[EVERY_5], handler_configs=HANDLERS, clock=clock)
        for s in stores
    ]
    async with anyio.create_task_group() as tg:
        for scheduler in schedulers * 3:
            tg.start_soon(scheduler.tick)
    assert len(await indexed_ids(redis, "default")) == 1
    [job_id] = await redis.lrange(K.inbox("default"), 0, -1)
    assert await redis.hget(K.job("default", job_id.decode()), "payload") == b'{"n":1}'
    # The next tick makes the next job.
    clock.now = ms("2026-11-24T10:10:00.100+00:00")
    assert await schedulers[0].tick() == ms("2026-11-24T10:15:00+00:00")
    await schedulers[1].tick()
    assert len(await indexed_ids(redis, "default")) == 2


async def test_the_enqueued_job_has_the_schedule_fields_and_priority(
    stores: list[Store], redis: Redis
) -> None:
    schedules = [
        ScheduleConfig(name="hot", cron="*/5 * * * *", type="echo", payload=[1], priority=9),
        ScheduleConfig(name="cold", cron="*/5 * * * *", type="echo", queue="bg", priority=0),
        ScheduleConfig(name="plain", cron="*/5 * * * *", type="echo"),
    ]
    now = ms("2026-11-24T10:05:00.500+00:00")
    scheduler = Scheduler(
        store=stores[0], schedules=schedules, handler_configs=HANDLERS, clock=Clock(now)
    )
    await scheduler.tick()
    tick = ms("2026-11-24T10:05:00+00:00")
    jobs = []
    for schedule in schedules:
        queue = schedule.queue or "default"
        run = await stores[0].schedule_run(queue, schedule.name)
        assert run is not None
        assert run[0] == tick
        assert run[1] is not None
        job = await stores[0].get_job(run[1], [queue])
        assert job is not None
        jobs.append(job)
    assert [(j.type, j.queue, j.payload, j.priority) for j in jobs] == [
        ("echo", "default", [1], 9),
        ("echo", "bg", None, 0),
        ("echo", "default", None, DEFAULT_PRIORITY),
    ]
    for job, schedule in zip(jobs, schedules, strict=True):
        assert (job.state, job.attempts, job.created_at) == (QUEUED, 0, now)
        assert job.max_attempts == HANDLERS["echo"].max_attempts
        assert job.idempotency_key == f"schedule:{schedule.name}:{tick}"


@pytest.mark.parametrize(("catch_up", "jobs"), [("none", 0), ("latest", 1)])
async def test_a_tick_missed_while_every_daemon_was_down(
    stores: list[Store], redis: Redis, catch_up: str, jobs: int
) -> None:
    schedule = ScheduleConfig(name="s", cron="*/5 * * * *", type="echo", catch_up=catch_up)
    clock = Clock(ms("2026-11-24T10:00:01+00:00"))
    scheduler = Scheduler(
        store=stores[0], schedules=[schedule], handler_configs=HANDLERS, clock=clock
    )
    await scheduler.tick()  # fires 10:00
    assert len(await indexed_ids(redis, "default")) == 1
    clock.now = ms("2026-11-24T10:17:00+00:00")  # down through 10:05, 10:10 and 10:15
    await scheduler.tick()
    assert len(await indexed_ids(redis, "default")) == 1 + jobs
    await scheduler.tick()  # the latest tick is handled once only
    assert len(await indexed_ids(redis, "default")) == 1 + jobs


async def test_a_new_schedule_does_not_fire_a_long_past_tick(
    stores: list[Store], redis: Redis
) -> None:
    schedule = ScheduleConfig(name="n", cron="0 0 * * *", type="echo", catch_up="latest")
    clock = Clock(ms("2026-11-24T10:00:00+00:00"))
    await Scheduler(
        store=stores[0], schedules=[schedule], handler_configs=HANDLERS, clock=clock
    ).tick()
    assert len(await indexed_ids(redis, "default")) == 0


async def test_get_schedules_shows_next_and_last_runs(redis_url: str) -> None:
    config = parse(
        {
            "server": {"listen": "127.0.0.1:0"},
            "redis": {"url": redis_url},
            "workers": {"heartbeat_interval": 0.5, "dead_after": 5, "shutdown_timeout": 1},
            "handlers": {"echo": {"builtin": "echo"}},
            "schedules": [{"name": "every-second", "cron": "* * * * *", "type": "echo"}],
        },
        env={},
    )
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        status, body = await get_json(session, f"{base_url(daemon)}/schedules")
    assert status == 200
    [view] = body["schedules"]
    assert view["name"] == "every-second"
    assert view["queue"] == "default"
    assert ms(view["next_run"]) > datetime.now(UTC).timestamp() * 1000


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [
        ({"name": "x", "cron": "61 * * * *", "type": "echo"}, "schedules[0].cron: not a cron"),
        ({"name": "x", "cron": "@daily", "type": "nope"}, "schedules[0].type: must name"),
        (
            {"name": "x", "cron": "@daily", "type": "echo", "timezone": "Mars/Base"},
            "unknown time zone",
        ),
        (
            {"name": "x", "cron": "@daily", "type": "echo", "catch_up": "all"},
            "catch_up: must be one of",
        ),
        ({"cron": "@daily", "type": "echo"}, "schedules[0].name: required"),
        (
            {"name": "x", "cron": "@daily", "type": "echo", "priority": 10},
            "schedules[0].priority: must be an integer from 0 to 9, got 10",
        ),
    ],
)
def test_bad_schedules_are_refused_with_their_key_path(
    schedule: dict[str, object], problem: str
) -> None:
    data = {"handlers": {"echo": {"builtin": "echo"}}, "schedules": [schedule]}
    with pytest.raises(ConfigError) as error:
        parse(data, env={})
    assert problem in str(error.value)
