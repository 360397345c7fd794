"""Prometheus metrics of a daemon: what it did, and queue depths read from Redis at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate
from typing import Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    generate_latest,
)
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from taskd import __version__
from taskd.jobs import STATES

# From 1 ms (a noop on an idle daemon) to 10 minutes (a long job, or a backlog).
BUCKETS = (
    .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
)  # fmt: skip

# How an attempt can end (store.Attempt.outcome) and the counter each one feeds.
OUTCOMES = ("completed", "retry", "failed", "cancelled")


class _HistogramChild:
    """One label set's counts: an observation is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one +Inf's
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound counts in that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Histogram(Collector):
    """A labelled histogram, exposed as prometheus_client's own would be.

    prometheus_client's takes a lock for each of its counts, about 1.4 us an observation;
    a daemon makes two per job, from one thread, and at tens of thousands of jobs a
    second that was a tenth of its work per job.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._bounds = buckets
        # Bucket labels as prometheus_client writes them (untyped there, hence the cast).
        le = cast(Callable[[float], str], floatToGoString)
        self._les = [*(le(b) for b in buckets), "+Inf"]
        self._children: dict[tuple[str, ...], _HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> _HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HistogramChild(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            cumulative = accumulate(child.counts)
            family.add_metric(
                list(values), list(zip(self._les, cumulative, strict=True)), child.sum
            )
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)


class _TypeChildren:
    """The labelled children of one (queue, type), so the per-job path skips .labels()."""

    __slots__ = ("enqueued", "outcomes", "run", "wait")

    def __init__(self, metrics: Metrics, queue: str, job_type: str) -> None:
        self.enqueued = metrics.enqueued_total.labels(queue, job_type)
        self.wait = metrics.wait_seconds.labels(queue)  # shared by the queue's types
        self.run = metrics.run_seconds.labels(queue, job_type)
        # Every outcome's counter exists from the first job on, at 0: a ratio such as
        # failed / (completed + failed) then has both sides before the first failure.
        self.outcomes: dict[str, Counter] = {
            outcome: counter.labels(queue, job_type)
            for outcome, counter in metrics.outcome_totals.items()
        }


class Metrics:
    """The metrics of one daemon, in a registry of its own.

    Counters and histograms count what this daemon did; Prometheus sums them over
    daemons. The queue depth gauges are cluster-wide, read from Redis, so every daemon
    reports the same numbers: dashboards and alerts take max() over instances, not sum().
    """

    def __init__(self, *, concurrency: int, job_types: Iterable[tuple[str, str]] = ()) -> None:
        """`job_types`: (queue, type) pairs whose series should exist, at 0, from the start.

        A counter series that first appears at 3 hides those 3 from increase() and rate(),
        so the configured handlers' series are best created before their first job.
        """
        # A registry per instance, not the global one: several daemons can live in one
        # process (the tests), and each must expose only its own numbers.
        self.registry = CollectorRegistry(auto_describe=True)
        self._init_counters()
        self._init_histograms()
        self._init_gauges(concurrency)
        self._types: dict[tuple[str, str], _TypeChildren] = {}
        self._cluster: set[tuple[str, str]] = set()
        self._stranded: set[tuple[str, str]] = set()
        for queue, job_type in job_types:
            self._children(queue, job_type)

    def _init_counters(self) -> None:
        r, by_type = self.registry, ("queue", "type")
        self.enqueued_total = Counter(
            "taskd_jobs_enqueued_total", "Jobs submitted through this daemon.", by_type, registry=r
        )
        self.outcome_totals: dict[str, Counter] = {
            "completed": Counter(
                "taskd_jobs_completed_total", "Jobs this daemon completed.", by_type, registry=r
            ),
            "retry": Counter(
                "taskd_jobs_retried_total",
                "Attempts that failed on this daemon and will be retried.",
                by_type,
                registry=r,
            ),
            "failed": Counter(
                "taskd_jobs_failed_total",
                "Jobs that failed for good on this daemon (out of attempts, or a permanent"
                " failure): the dead letters.",
                by_type,
                registry=r,
            ),
            "cancelled": Counter(
                "taskd_jobs_cancelled_total",
                "Running jobs this daemon cancelled.",
                by_type,
                registry=r,
            ),
        }
        self.attempts_lost_total = Counter(
            "taskd_attempts_lost",
            "Attempts this daemon ran whose outcome was not recorded: their job had been"
            " taken back from it (taken for dead: a long pause, a partition) and runs or ran"
            " elsewhere; stopped when noticed, else their late result refused.",
            ("queue",),
            registry=r,
        )
        self.redis_data_lost_total = Counter(
            "taskd_redis_data_lost",
            "Times this daemon's heartbeat found Redis emptied under it (restarted without"
            " persistence, failed over to an empty replica): the jobs stored before are gone.",
            registry=r,
        )
        self.recovered_total = Counter(
            "taskd_jobs_recovered_total",
            "Jobs this daemon's reaper took back from dead daemons.",
            ("queue",),
            registry=r,
        )
        self.limit_waits_total = Counter(
            "taskd_job_limit_waits_total",
            "Times this daemon's claims found a job over its type's limit (rate_limit or"
            " concurrency, its global_concurrency): the job waited, its attempt kept.",
            ("queue", "limit"),
            registry=r,
        )

    def _init_histograms(self) -> None:
        r = self.registry
        self.wait_seconds = _Histogram(
            "taskd_job_wait_seconds",
            "Time from queued to started, of jobs this daemon started.",
            ("queue",),
            BUCKETS,
            r,
        )
        self.run_seconds = _Histogram(
            "taskd_job_run_seconds",
            "Time an attempt ran on this daemon, whatever its outcome.",
            ("queue", "type"),
            BUCKETS,
            r,
        )

    def _init_gauges(self, concurrency: int) -> None:
        r = self.registry
        self.queue_jobs = Gauge(
            "taskd_queue_jobs",
            "Jobs per queue and state now, cluster-wide (every daemon reports the same"
            " numbers: take max over instances).",
            ("queue", "state"),
            registry=r,
        )
        self.active_jobs = Gauge(
            "taskd_daemon_active_jobs", "Slots of this daemon in use.", registry=r
        )
        self.concurrency = Gauge(
            "taskd_daemon_concurrency", "Most jobs this daemon runs at once.", registry=r
        )
        self.concurrency.set(concurrency)
        self.callbacks_pending = Gauge(
            "taskd_callbacks_pending",
            "Callbacks waiting in a queue's outbox to be sent, cluster-wide (take max).",
            ("queue",),
            registry=r,
        )
        self.without_handler = Gauge(
            "taskd_jobs_without_handler_wait_seconds",
            "How long the oldest ready job a claim passed has waited, per queue and job type"
            " that no live daemon serving the queue has a handler for; cluster-wide (take"
            " max). No series while every type has a daemon.",
            ("queue", "type"),
            registry=r,
        )
        self.archive_pending = Gauge(
            "taskd_archive_pending",
            "Finished jobs waiting in Redis to be written to the archive, cluster-wide (take"
            " max); 0 without [archive].",
            registry=r,
        )
        self.archive_oldest = Gauge(
            "taskd_archive_oldest_age_seconds",
            "How long ago the oldest job waiting to be archived ended, cluster-wide (take"
            " max); 0 while none waits.",
            registry=r,
        )
        self.desired_daemons = Gauge(
            "taskd_autoscale_desired_daemons",
            "Daemons of the current size that would drain the backlog within [autoscale]"
            " target_drain_s, from min_daemons to max_daemons; cluster-wide (take max).",
            registry=r,
        )
        self.daemons_live = Gauge(
            "taskd_daemons_live",
            "Daemons registered and heartbeating, cluster-wide (take max over instances).",
            registry=r,
        )
        Info("taskd_build", "The taskd version of this daemon.", registry=r).info(
            {"version": __version__}
        )

    def _children(self, queue: str, job_type: str) -> _TypeChildren:
        key = (queue, job_type)
        children = self._types.get(key)
        if children is None:
            children = self._types[key] = _TypeChildren(self, queue, job_type)
        return children

    def enqueued(self, queue: str, job_type: str, count: int = 1) -> None:
        """Jobs submitted through this daemon's intake."""
        self._children(queue, job_type).enqueued.inc(count)

    def started(self, queue: str, job_type: str, wait_seconds: float) -> None:
        """An attempt started, `wait_seconds` after its job was queued."""
        self._children(queue, job_type).wait.observe(wait_seconds)

    def finished(self, queue: str, job_type: str, outcome: str, run_seconds: float) -> None:
        """An attempt ended: `outcome` is completed, retry, failed or cancelled."""
        children = self._children(queue, job_type)
        try:
            counter = children.outcomes[outcome]
        except KeyError:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}") from None
        counter.inc()
        children.run.observe(run_seconds)

    def attempt_lost(self, queue: str) -> None:
        """An attempt of this daemon's ended without its outcome: the job had been taken
        back (this daemon was taken for dead) and a newer attempt owns its record."""
        self.attempts_lost_total.labels(queue).inc()

    def redis_data_lost(self) -> None:
        """A heartbeat found Redis emptied under it."""
        self.redis_data_lost_total.inc()

    def recovered(self, queue: str, count: int) -> None:
        """Jobs this daemon's reaper took back from dead daemons."""
        self.recovered_total.labels(queue).inc(count)

    def limited(self, queue: str, rate: int, concurrency: int) -> None:
        """A claim made jobs wait for their type's limits."""
        if rate:
            self.limit_waits_total.labels(queue, "rate_limit").inc(rate)
        if concurrency:
            self.limit_waits_total.labels(queue, "concurrency").inc(concurrency)

    def set_active(self, active: int) -> None:
        self.active_jobs.set(active)

    def set_cluster(self, counts: Mapping[str, Mapping[str, Any]], live_daemons: int) -> None:
        """Queue depths as Inspector.queue_counts returns them, and the live daemons.

        Label sets of queues (or states) no longer reported are removed, so a queue that
        left the configuration does not linger at its last depth.
        """
        seen: set[tuple[str, str]] = set()
        for queue, states in counts.items():
            # At 0 before the first recovery, so that increase() sees that one too.
            self.recovered_total.labels(queue)
            self.attempts_lost_total.labels(queue)
            for state in STATES:
                if state in states:
                    self.queue_jobs.labels(queue, state).set(states[state])
                    seen.add((queue, state))
            self.callbacks_pending.labels(queue).set(states.get("callbacks_pending", 0))
        for gone in self._cluster - seen:
            self.queue_jobs.remove(*gone)
        self._cluster = seen
        self.daemons_live.set(live_daemons)

    def set_desired_daemons(self, desired: int) -> None:
        """The fleet's autoscaling hint, as /stats gives it (autoscale.desired_daemons)."""
        self.desired_daemons.set(desired)

    def set_archive(self, backlog: Mapping[str, Any]) -> None:
        """The archive hand-offs' backlog, as stats.archive_backlog returns it."""
        self.archive_pending.set(backlog["pending"])
        self.archive_oldest.set(backlog["oldest_age_s"] or 0)

    def set_without_handler(self, stranded: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        """Ready job types no live daemon can run, as stats.no_handler returns them."""
        seen: set[tuple[str, str]] = set()
        for queue, types in stranded.items():
            for job_type, entry in types.items():
                self.without_handler.labels(queue, job_type).set(entry["wait_ms"] / 1000)
                seen.add((queue, job_type))
        for gone in self._stranded - seen:
            self.without_handler.remove(*gone)
        self._stranded = seen

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for a /metrics answer."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
