"""`[workers] queue_mode`, strict or weighted: its config, and daemons that share a Redis."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from taskd.config import Config, ConfigError, WorkersConfig, parse
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Keys, Store
from tests.support import BUILTINS, make_config, running_daemon, wait_until

K = Keys("taskd")
QUEUES = ["high", "low"]
# Two daemons of this many slots each share the queues in the tests with Redis.
CONCURRENCY = 2


# Configuration


def workers_config(**workers: Any) -> WorkersConfig:
    data = {"workers": {"queues": QUEUES, **workers}, "handlers": dict(BUILTINS)}
    return parse(data, env={}).workers


def test_mode_defaults_to_weighted_with_equal_weights() -> None:
    assert workers_config() == WorkersConfig(queues=("high", "low"), queue_mode="weighted")
    assert workers_config().weights == ()
    assert workers_config(queue_mode="strict").queue_mode == "strict"
    weighted = workers_config(queue_mode="weighted", weights={"low": 1, "high": 1000})
    assert weighted.weights == (("low", 1), ("high", 1000))
    hash(weighted)  # frozen, and hashable all through


@pytest.mark.parametrize(
    ("workers", "problem"),
    [
        ({"queue_mode": "fair"}, "workers.queue_mode: must be one of strict, weighted, got 'fair'"),
        ({"queue_mode": "Strict"}, "workers.queue_mode: must be one of strict, weighted"),
        ({"queue_mode": 1}, "workers.queue_mode: must be a string, got integer 1"),
        (
            {"queue_mode": "strict", "weights": {"high": 2}},
            'workers.weights: only queue_mode = "weighted" takes weights, not "strict"',
        ),
        (
            {"weights": {"mail": 2}},
            "workers.weights.mail: not a queue of workers.queues (high, low)",
        ),
        ({"weights": {"high": 2.5}}, "workers.weights.high: must be an integer, got float 2.5"),
        ({"weights": {"high": "3"}}, "workers.weights.high: must be an integer, got string '3'"),
        ({"weights": {"high": True}}, "workers.weights.high: must be an integer, got boolean"),
        ({"weights": {"high": 0}}, "workers.weights.high: must be an integer from 1 to 1000"),
        ({"weights": {"high": 1001}}, "workers.weights.high: must be an integer from 1 to 1000"),
        ({"weights": [3, 1]}, "workers.weights: must be a table, got array"),
    ],
)
def test_config_errors(workers: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        workers_config(**workers)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(problem)


# Daemons sharing a Redis


def mode_config(redis_url: str, **workers: Any) -> Config:
    return make_config(redis_url, workers={"queues": QUEUES, "concurrency": CONCURRENCY, **workers})


async def fill(redis_url: str, queue: str, count: int, seconds: float) -> list[str]:
    """`count` sleep jobs in `queue`, all made ready by one script call."""
    store = Store.from_url(redis_url, prefix="taskd")
    try:
        payload = {"seconds": seconds}
        jobs = [Job(new_id(), "sleep", queue, payload, QUEUED, 0, now_ms()) for _ in range(count)]
        await store.enqueue_many(jobs)
        return [job.id for job in jobs]
    finally:
        await store.close()


def completed(redis: Redis, queue: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return int(await redis.zcard(K.completed(queue))) >= count

    return check


async def starts(redis: Redis, queue: str, ids: Sequence[str]) -> dict[str, tuple[int, str]]:
    """When (epoch ms, claim time) and by which daemon each job that started did."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(K.job(queue, job_id), "started_at", "daemon")
        rows = await pipe.execute()
    return {
        job_id: (int(at), daemon.decode())
        for job_id, (at, daemon) in zip(ids, rows, strict=True)
        if at is not None
    }


async def test_strict_starts_no_low_job_while_high_has_ready_ones(
    redis_url: str, redis: Redis
) -> None:
    high = await fill(redis_url, "high", 24, 0.05)
    low = await fill(redis_url, "low", 12, 0.05)
    config = mode_config(redis_url, queue_mode="strict")
    async with running_daemon(config), running_daemon(config):
        await wait_until(completed(redis, "high", len(high)), "every high job to complete")
        await wait_until(completed(redis, "low", len(low)), "every low job to complete")
    high_starts = await starts(redis, "high", high)
    low_starts = await starts(redis, "low", low)
    assert len(high_starts) == len(high)
    assert len(low_starts) == len(low)
    # A claim's time is read before it runs, and a low claim follows a high claim that
    # found the queue empty: so no low job started before the last high one.
    last_high = max(at for at, _ in high_starts.values())
    first_low = min(at for at, _ in low_starts.values())
    assert first_low >= last_high


async def test_strict_a_high_job_arriving_stops_low_from_taking_new_slots(
    redis_url: str, redis: Redis
) -> None:
    config = mode_config(redis_url, queue_mode="strict")
    async with running_daemon(config) as first, running_daemon(config) as second:
        low = await fill(redis_url, "low", 80, 0.1)
        await wait_until(completed(redis, "low", 2 * CONCURRENCY), "low jobs to run")
        high = await fill(redis_url, "high", 24, 0.1)
        await wait_until(completed(redis, "high", len(high)), "every high job to complete")
        high_starts = await starts(redis, "high", high)
        low_starts = await starts(redis, "low", low)
    # Both daemons were blocked on the empty high queue, and each got jobs of it.
    assert {daemon for _, daemon in high_starts.values()} == {
        first.identity.id,
        second.identity.id,
    }
    # While high has jobs, low starts only what its claims in flight when high's jobs
    # arrived still bring: at most each daemon's slots, twice for the two daemons' wake-ups
    # not being at the same instant. Weighted 1:1, about 24 low jobs would start meanwhile.
    begin = min(at for at, _ in high_starts.values())
    end = max(at for at, _ in high_starts.values())
    meanwhile = [at for at, _ in low_starts.values() if begin < at < end]
    assert len(meanwhile) <= 2 * 2 * CONCURRENCY, sorted(meanwhile)
    assert end - begin >= 100  # high took longer than one run of its jobs: a real window


async def test_weighted_shares_starts_by_the_weights(redis_url: str, redis: Redis) -> None:
    high = await fill(redis_url, "high", 120, 0.1)
    low = await fill(redis_url, "low", 120, 0.1)
    first_n = 60
    config = mode_config(redis_url, queue_mode="weighted", weights={"high": 3})
    async with running_daemon(config), running_daemon(config):

        async def enough_started() -> bool:
            done = await redis.zcard(K.completed("high")) + await redis.zcard(K.completed("low"))
            return int(done) >= first_n

        await wait_until(enough_started, f"{first_n} jobs to complete")
        # Read while the daemons run: at shutdown, unfinished jobs lose their start.
        started = [(at, "high") for at, _ in (await starts(redis, "high", high)).values()]
        started += [(at, "low") for at, _ in (await starts(redis, "low", low)).values()]
    queues = [queue for _, queue in sorted(started)[:first_n]]
    highs, lows = queues.count("high"), queues.count("low")
    assert lows > 0  # no starvation
    assert 2.0 <= highs / lows <= 4.5, (highs, lows)
