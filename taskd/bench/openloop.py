"""The open-loop workload: stamp jobs offered at fixed Poisson rates, whatever the daemon does."""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from taskd.bench.harness import (
    OPEN_LOOP_DRAIN,
    OPEN_LOOP_SECONDS,
    QUEUE,
    Bench,
    Local,
)
from taskd.bench.report import Figure, latency_figures, percentile
from taskd.bench.workloads import daemon_cpu, span, stamps
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Store

LOADS = (50, 80)  # % of the maximum drain rate measured in the same round
SEED = 1  # the same arrival gaps every round, at a given rate
QUANTILES = (0.50, 0.99, 0.999)
TIMER_SECONDS = 0.001  # the event loop's timer resolution


@dataclass(frozen=True, slots=True)
class Offered:
    """The jobs of one load level as the generator sent them; times are epoch ns."""

    ids: list[str]
    due: list[int]  # when each job was scheduled to arrive
    sent: list[int]  # when the call that sent it went out
    cpu_seconds: float  # the bench process's CPU time while it sent them

    def lags_ms(self) -> list[float]:
        """How late each job was sent, in ms."""
        return [(sent - due) / 1e6 for sent, due in zip(self.sent, self.due, strict=True)]


async def open_loop(bench: Bench) -> list[Figure]:
    """One daemon (100 slots): its maximum drain rate, then stamp jobs arriving at random
    (Poisson) at 50% and 80% of that rate, from each one's scheduled arrival to its handler
    starting."""
    local = bench.need_local()
    seconds = bench.scaled(OPEN_LOOP_SECONDS)
    rng = random.Random(SEED)
    async with bench.daemons(1, concurrency=100) as [daemon]:
        finished = bench.scaled(OPEN_LOOP_DRAIN)
        cpu = daemon.cpu_seconds()
        rate = await max_drain(bench, local, finished)
        figures = [Figure("max drain", "jobs/s", rate), *daemon_cpu(daemon, cpu, finished, "")]
        for load in LOADS:
            cpu = daemon.cpu_seconds()
            offered = await _offer(local.store, arrivals(rng, rate * load / 100, seconds))
            finished += len(offered.ids)
            await bench.wait_finished(finished)
            used = daemon_cpu(daemon, cpu, len(offered.ids), f" @{load}%")
            started = await stamps(local, offered.ids)
            latencies = [(t - due) / 1e6 for t, due in zip(started, offered.due, strict=True)]
            figures += [*_level(bench, load, seconds, offered, latencies), *used]
    bench.note(
        f"open-loop: one daemon (100 slots); max drain: {bench.scaled(OPEN_LOOP_DRAIN):,} "
        f"noop jobs waiting; then stamp jobs arriving at random (Poisson) at "
        f"{' and '.join(f'{load}%' for load in LOADS)} of it, {seconds:g} s each; latency "
        "from each job's scheduled arrival (not its sending) to its handler starting; lag: "
        "how far behind its schedule the bench sent a job; bench CPU: the bench process's "
        "(which sends the jobs) while it sends them, in % of one core; daemon CPU: from the "
        "first job sent to the last one finished, per job"
    )
    return figures


async def max_drain(bench: Bench, local: Local, n: int) -> float:
    """jobs/s of `n` noop jobs, all waiting when the daemon starts them (as drain does)."""
    # Paused while they are put there, so that the daemon does not take them as they come.
    await local.store.pause(QUEUE)
    ids = await local.enqueue(n, "noop", None)
    await local.store.resume(QUEUE)
    await bench.wait_finished(n)
    return n / span(await local.records(ids, ("started_at", "finished_at")))


def arrivals(rng: random.Random, rate: float, seconds: float) -> list[float]:
    """Poisson arrivals at `rate` per s over `seconds`: s from the start, ascending."""
    gaps = (rng.expovariate(rate) for _ in itertools.count())
    return list(itertools.takewhile(lambda t: t < seconds, itertools.accumulate(gaps)))


async def _offer(store: Store, arrivals: Sequence[float]) -> Offered:
    """Send stamp jobs on their schedule: at each wake-up, every job due by then in one
    enqueue_many, then sleep until the next one is due.

    The schedule does not wait for the daemon (open loop): a daemon that stalls faces the
    jobs that arrived meanwhile, and a generator that falls behind shows in the lag.
    """
    ids = [new_id() for _ in arrivals]
    due = [int(t * 1e9) for t in arrivals]
    sent: list[int] = []
    cpu = time.process_time()
    # The wall clock, as the stamp handler's: its time minus a job's due time is the latency.
    begin = time.time_ns()
    while len(sent) < len(ids):
        now = time.time_ns() - begin
        if due[len(sent)] > now:
            # Never less than the loop's timer resolution: a shorter sleep returns at once,
            # and the generator would spin, taking a core from the daemon. The jobs that
            # fall due meanwhile go out up to that much late, which their latency counts.
            await anyio.sleep(max(TIMER_SECONDS, (due[len(sent)] - now) / 1e9))
            continue
        upto = bisect.bisect_right(due, now, lo=len(sent))
        created = now_ms()
        jobs = [
            Job(ids[i], "stamp", QUEUE, None, QUEUED, 0, created, max_attempts=1)
            for i in range(len(sent), upto)
        ]
        sent += [time.time_ns()] * len(jobs)
        await store.enqueue_many(jobs)
    cpu = time.process_time() - cpu
    return Offered(ids, [begin + t for t in due], sent, cpu)


def _level(
    bench: Bench, load: int, seconds: float, offered: Offered, latencies: Sequence[float]
) -> list[Figure]:
    """The figures of one load level, their names ending in @<load>%."""
    at = f" @{load}%"
    lags = offered.lags_ms()
    if percentile(lags, 0.99) > percentile(latencies, 0.99) / 2:
        bench.note(
            f"open-loop{at}: the bench could not keep to its schedule: it sent 1% of the jobs "
            f"{percentile(lags, 0.99):.1f} ms or more late, at least half their p99 latency, "
            "which counts that delay: the figures measure the bench as much as the daemon"
        )
    return [
        Figure(f"offered{at}", "jobs/s", len(offered.ids) / seconds),
        *latency_figures(latencies, QUANTILES, at),
        Figure(f"max lag{at}", "ms", max(lags)),
        Figure(f"bench CPU{at}", "%", offered.cpu_seconds / seconds * 100),
    ]
