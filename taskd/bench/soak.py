"""The soak workload: a steady load for minutes, and whether memory and keys stay flat."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import orjson

from taskd.bench.harness import QUEUE, Bench, BenchError, SoakPlan, Spawned
from taskd.bench.report import Figure
from taskd.bench.workloads import BATCH_SIZE

SOAK_RETENTION = 60  # s, completed and failed: so that finished jobs expire within the run
SOAK_TICK = 0.1  # s between batches at the nominal rate
SOAK_SAMPLE = 10.0  # s between samples (shorter runs take 10 samples)
SOAK_EARLY = 60.0  # s: the "at 1 min" sample (a third of the way into shorter runs)
MIB = 1024 * 1024

SOAK_CONFIG = f"\n[retention]\ncompleted = {SOAK_RETENTION}\nfailed = {SOAK_RETENTION}\n"


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the soak: the daemon's RSS, Redis memory and keys, the queue's backlog."""

    t: float  # s since the soak started
    rss: float | None  # MiB, VmRSS; None where /proc does not tell
    redis: float  # MiB, INFO memory used_memory
    keys: int  # DBSIZE
    queued: int  # /stats


async def soak(bench: Bench) -> list[Figure]:
    """One daemon (100 slots, retention 60 s), noop jobs POSTed at a steady rate for minutes:
    its RSS, Redis memory and key count, sampled, should stay flat once retention deletes."""
    plan = bench.soak
    submitter = _Submitter(bench, plan.rate)
    async with bench.daemons(1, concurrency=100, extra=SOAK_CONFIG) as [daemon]:
        begin = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(submitter.run, daemon.url, begin, begin + plan.seconds)
            samples = await _soak_samples(bench, daemon, begin, plan.seconds, submitter)
    _soak_notes(bench, plan, submitter, samples)
    return [
        Figure("submitted", "jobs", submitter.sent),
        Figure("submit rate", "jobs/s", submitter.sent / plan.seconds),
        *_soak_figures(samples, plan.seconds),
        Figure("max backlog", "jobs", max(s.queued for s in samples)),
    ]


@dataclass
class _Submitter:
    """POST /jobs/batch of noop jobs on a fixed schedule: a batch every `tick` seconds. Late,
    it catches up, but with at most one extra batch at once; batches further behind are
    skipped (and counted), so the daemon never gets a burst."""

    bench: Bench
    rate: int
    size: int = 0
    sent: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.size = min(BATCH_SIZE, math.ceil(self.rate * SOAK_TICK))

    @property
    def tick(self) -> float:
        return self.size / self.rate

    async def run(self, url: str, begin: float, end: float) -> None:
        body = orjson.dumps({"jobs": [{"type": "noop"}] * self.size})
        slot = 0
        while begin + slot * self.tick < end:
            await anyio.sleep_until(begin + slot * self.tick)
            await self.bench.call("POST", f"{url}/jobs/batch", body)
            self.sent += self.size
            due = int((anyio.current_time() - begin) / self.tick)  # the latest slot due
            following = max(slot + 1, due - 1)
            self.skipped += following - slot - 1
            slot = following


async def _soak_samples(
    bench: Bench, daemon: Spawned, begin: float, seconds: int, submitter: _Submitter
) -> list[Sample]:
    """A sample every SOAK_SAMPLE seconds (10 in all for short runs), the last at the end."""
    interval = min(SOAK_SAMPLE, seconds / 10)
    samples: list[Sample] = []
    for k in range(1, round(seconds / interval) + 1):
        await anyio.sleep_until(begin + k * interval)
        if daemon.proc.poll() is not None:
            raise BenchError(f"the daemon exited ({daemon.proc.returncode})\n{daemon.tail()}")
        sample = await _sample(bench, daemon, k * interval)
        samples.append(sample)
        rss = "?" if sample.rss is None else f"{sample.rss:.1f}"
        print(
            f"soak {sample.t:5.0f} s: RSS {rss} MiB, Redis {sample.redis:.1f} MiB, "
            f"{sample.keys:,} keys, {sample.queued:,} queued, {submitter.sent:,} submitted",
            file=sys.stderr,
            flush=True,
        )
    return samples


async def _sample(bench: Bench, daemon: Spawned, t: float) -> Sample:
    local = bench.need_local()
    memory, keys = await local.inspector.memory_and_keys()
    stats = await bench.json("GET", f"{daemon.url}/stats")
    queued = int(stats.get("queues", {}).get(QUEUE, {}).get("queued", 0))
    rss = daemon.rss_mib()
    return Sample(t, rss, memory / MIB, keys, queued)


def _soak_series(samples: Sequence[Sample]) -> list[tuple[str, str, list[float]]]:
    """(name, unit, values) of each series that grows if something leaks."""
    series = [
        ("Redis memory", "MiB", [s.redis for s in samples]),
        ("keys", "keys", [float(s.keys) for s in samples]),
    ]
    rss = [s.rss for s in samples if s.rss is not None]
    if len(rss) == len(samples):
        series.insert(0, ("daemon RSS", "MiB", rss))
    return series


def _soak_figures(samples: Sequence[Sample], seconds: int) -> list[Figure]:
    """Per series: at 1 min, at the end, and its growth from the middle to the last third."""
    early = max(i for i, s in enumerate(samples) if s.t <= min(SOAK_EARLY, seconds / 3) + 1e-6)
    figures: list[Figure] = []
    for name, unit, values in _soak_series(samples):
        figures += [
            Figure(f"{name} at 1 min", unit, values[early]),
            Figure(f"{name} at end", unit, values[-1]),
            Figure(f"{name} growth", "%", growth(values)),
        ]
    return figures


def growth(values: Sequence[float]) -> float:
    """(mean of the last third - mean of the middle third) / mean of the middle third, in %."""
    third = len(values) // 3
    if third == 0:
        return 0.0
    middle = statistics.fmean(values[third : 2 * third])
    last = statistics.fmean(values[len(values) - third :])
    return (last - middle) / middle * 100 if middle else 0.0


def _soak_notes(
    bench: Bench, plan: SoakPlan, submitter: _Submitter, samples: Sequence[Sample]
) -> None:
    every = f"every {samples[0].t:g} s"
    bench.note(
        f"soak: one daemon (100 slots), [retention] completed and failed {SOAK_RETENTION} s, "
        f"noop jobs in batches of {submitter.size:,} every {submitter.tick * 1e3:g} ms "
        f"({plan.rate:,}/s) for {plan.seconds:,} s; sampled {every}; growth: last third of the "
        "samples against the middle third"
    )
    bench.note(
        f"soak: samples fall as a batch arrives, so a backlog of up to one batch "
        f"({submitter.size:,}) means the daemon keeps up; keys and Redis memory swing by about "
        "10 s of jobs, as the janitor deletes expired ones every 10 s"
    )
    if plan.seconds < 3 * SOAK_EARLY:
        bench.note("soak: in a run under 3 min, 'at 1 min' is a third of the way in")
    if submitter.skipped:
        bench.note(
            f"soak: the submitter fell behind and skipped {submitter.skipped:,} batches "
            f"({submitter.skipped * submitter.size:,} jobs): see the submit rate"
        )
    for name, unit, values in _soak_series(samples):
        bench.note(f"soak {name} ({unit}), {every}: {' '.join(_short(v) for v in values)}")
    bench.note(f"soak queued, {every}: {' '.join(str(s.queued) for s in samples)}")


def _short(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"
