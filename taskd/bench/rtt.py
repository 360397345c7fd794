"""The rtt workload: drain and intake of one daemon whose Redis is a few milliseconds away."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

from taskd.bench import delay
from taskd.bench.harness import PREFIX, RTT_DRAIN, RTT_INTAKE, Bench, BenchError, Spawned
from taskd.bench.openloop import max_drain
from taskd.bench.report import Figure
from taskd.bench.workloads import SINGLE_CLIENTS, paused, post_singles
from taskd.store import UNAVAILABLE, Store

# Round trips the proxy adds, in ms, (full, --quick); the first is the baseline.
RTTS_MS = ((0.0, 0.5, 1.0, 2.0, 5.0), (0.0, 2.0))
PINGS = 20
SLOTS = 100  # the daemon's concurrency, as drain's
# A second daemon's, drained behind each round trip too: a daemon drains at most its slots
# over a round trip, so this many show what covering a longer one takes.
WIDE_SLOTS = 800


@dataclass(frozen=True, slots=True)
class _Step:
    """What one added round trip measured."""

    round_trip_ms: float  # the median PING through the proxy
    drain: float  # jobs/s
    intake: float  # jobs/s
    wide_drain: float  # jobs/s, with WIDE_SLOTS
    drain_proxy_cpu: float | None  # % of one core the proxy used, None where /proc does not tell
    intake_proxy_cpu: float | None


async def rtt(bench: Bench) -> list[Figure]:
    """For each added round trip, one daemon (100 slots) with its Redis behind a delay
    proxy: its drain rate, its intake from 100 clients, and how much of 0 ms's they keep;
    then the drain rate of one with WIDE_SLOTS."""
    steps: dict[float, _Step] = {}
    for rtt_ms in RTTS_MS[bench.quick]:
        await bench.reset()
        steps[rtt_ms] = await _step(bench, rtt_ms)
    _notes(bench)
    return _figures(steps)


async def _step(bench: Bench, rtt_ms: float) -> _Step:
    """A drain (as open-loop measures its max), then intake-single's, through one proxy;
    then a drain by a daemon of WIDE_SLOTS."""
    local = bench.need_local()
    drain_jobs, intake_jobs = bench.scaled(RTT_DRAIN), bench.scaled(RTT_INTAKE)
    async with bench.delay_proxy(rtt_ms) as proxy:
        round_trip = await _round_trip(proxy)
        async with bench.daemons(1, concurrency=SLOTS, redis_url=proxy.url) as [daemon]:
            cpu = proxy.cpu_seconds()
            drain = await max_drain(bench, local, drain_jobs)
            drain_cpu = _used(proxy, cpu)
            async with paused(bench, daemon.url):
                cpu = proxy.cpu_seconds()
                elapsed, _ = await post_singles(bench, daemon.url, intake_jobs)
                intake_cpu = _used(proxy, cpu)
        await bench.reset()
        async with bench.daemons(1, concurrency=WIDE_SLOTS, redis_url=proxy.url):
            wide_drain = await max_drain(bench, local, drain_jobs)
    return _Step(
        round_trip_ms=round_trip,
        drain=drain,
        intake=intake_jobs / elapsed,
        wide_drain=wide_drain,
        # Over the drain's span, not the whole wait (the enqueue, the polls after the end).
        drain_proxy_cpu=None if drain_cpu is None else drain_cpu / (drain_jobs / drain) * 100,
        intake_proxy_cpu=None if intake_cpu is None else intake_cpu / elapsed * 100,
    )


async def _round_trip(proxy: Spawned) -> float:
    """The median ms of PINGs through the proxy, one at a time, after one to connect."""
    store = Store.from_url(proxy.url, prefix=PREFIX)
    times: list[float] = []
    try:
        await store.ping()
        for _ in range(PINGS):
            started = time.perf_counter()
            await store.ping()
            times.append((time.perf_counter() - started) * 1e3)
    except UNAVAILABLE as exc:
        raise BenchError(
            f"Redis does not answer through the delay proxy: {exc!r}\n{proxy.tail()}"
        ) from None
    finally:
        await store.close()
    return statistics.median(times)


def _used(proxy: Spawned, cpu_before: float | None) -> float | None:
    """CPU seconds the proxy used since it had used `cpu_before`."""
    cpu = proxy.cpu_seconds()
    return None if cpu is None or cpu_before is None else cpu - cpu_before


def _figures(steps: Mapping[float, _Step]) -> list[Figure]:
    """The round trips, each curve and what it kept of the baseline, the proxy's CPU."""
    base_ms, base = next(iter(steps.items()))
    figures = [Figure(f"round trip {_at(ms)}", "ms", s.round_trip_ms) for ms, s in steps.items()]
    figures += _curve("drain", {ms: s.drain for ms, s in steps.items()})
    figures += _curve("intake", {ms: s.intake for ms, s in steps.items()})
    figures += _curve(f"drain {WIDE_SLOTS} slots", {ms: s.wide_drain for ms, s in steps.items()})
    for name, share in (("drain", base.drain_proxy_cpu), ("intake", base.intake_proxy_cpu)):
        if share is not None:
            figures.append(Figure(f"proxy CPU in {name} {_at(base_ms)}", "% of a core", share))
    return figures


def _curve(name: str, rates: Mapping[float, float]) -> list[Figure]:
    """jobs/s at each round trip, then the % of the baseline's kept at each other one."""
    base_ms, base = next(iter(rates.items()))
    return [Figure(f"{name} {_at(ms)}", "jobs/s", rate) for ms, rate in rates.items()] + [
        Figure(f"{name} kept {_at(ms)}", f"% of {_at(base_ms)}", rate / base * 100)
        for ms, rate in rates.items()
        if ms != base_ms
    ]


def _at(rtt_ms: float) -> str:
    return f"@{rtt_ms:g}ms"


def _notes(bench: Bench) -> None:
    bench.note(
        f"rtt: one daemon ({SLOTS} slots) whose Redis connections go through a delay proxy "
        f"(taskd.bench.delay, a process of its own, {delay.TIMERS} timers) that forwards each "
        "chunk half the added round trip after it came, in each direction, however many are "
        "in flight; the bench's own reads and writes go to Redis directly"
    )
    bench.note(
        "rtt: @0ms is through the proxy with no delay, so that the delay is the only "
        "variable (and 'kept' is the % of the @0ms figure of the same round); compare @0ms "
        "with drain for the proxy's own cost. round trip: the median of "
        f"{PINGS} PINGs through the proxy, what the daemon's Redis calls wait"
    )
    bench.note(
        f"rtt: drain: {bench.scaled(RTT_DRAIN):,} noop jobs waiting, first start to last "
        f"finish; intake: intake-single's {SINGLE_CLIENTS} clients, "
        f"{bench.scaled(RTT_INTAKE):,} jobs; proxy CPU: the share of one core it used "
        "meanwhile at the baseline, where it forwards the most"
    )
    bench.note(
        f"rtt: drain {WIDE_SLOTS} slots: the same drain by a daemon of {WIDE_SLOTS} slots "
        f"behind the same proxy: a daemon drains at most its slots over the round trip, and "
        f"{SLOTS} cover a local Redis but not one a few ms away"
    )
