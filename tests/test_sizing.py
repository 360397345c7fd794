"""The autoscaling hint: its formula over given loads, the rates it reads from Redis, and
/stats and /metrics of a real daemon under a backlog."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskd.config import AutoscaleConfig
from taskd.metrics import Metrics
from taskd.sizing import Load, desired_daemons, drain_s, fleet_load, public, queue_load
from taskd.store import DaemonInfo, Inspector, Rates, Store
from tests.builders import Clock, Q, ended, new_job
from tests.support import ECHO, REPO, DaemonApi, get_json, post_json, wait_until

POLICY = AutoscaleConfig(target_drain_s=10.0, min_daemons=1, max_daemons=20)
MINUTE_MS = 60_000


def daemon(n: int, concurrency: int = 10, queues: tuple[str, ...] = (Q,)) -> DaemonInfo:
    return DaemonInfo(f"d{n}", "host", n, 0, concurrency, queues, 0, 0)


def rates(
    *,
    arrived: int = 0,
    finished: int = 0,
    due: int = 0,
    mean_run_ms: float | None = 500.0,
    paused: bool = False,
) -> Rates:
    """A minute's rates: `arrived` and `finished` jobs in it."""
    return Rates(arrived, finished, MINUTE_MS, due, mean_run_ms, paused)


def load(
    *,
    queued: int = 0,
    active: int = 0,
    daemons: int = 1,
    concurrency: int = 10,
    target_drain_s: float = 10.0,
    **given: float | bool | None,
) -> Load:
    serving = [daemon(n, concurrency) for n in range(daemons)]
    return queue_load(
        queued=queued,
        active=active,
        rates=rates(**given),  # type: ignore[arg-type]
        serving=serving,
        live=serving,
        target_drain_s=target_drain_s,
    )


# The formula, over given loads


def test_an_idle_queue_needs_nothing_and_the_hint_is_min_daemons() -> None:
    idle = load(daemons=3)
    assert (idle.backlog, idle.needed, drain_s(idle)) == (0, 0.0, 0.0)
    assert desired_daemons(idle, POLICY) == 1
    assert desired_daemons(idle, AutoscaleConfig(min_daemons=2)) == 2


def test_a_backlog_asks_for_the_daemons_that_drain_it_within_the_target() -> None:
    # 10 slots a daemon, half a second a job: a daemon completes 20 jobs a second, and
    # 1,000 jobs in 10 s need 100 a second: 5 daemons.
    busy = load(queued=990, due=10, daemons=1)
    assert busy.backlog == 1000
    assert busy.per_daemon_per_s == 20.0
    assert busy.needed == pytest.approx(5.0)
    assert desired_daemons(busy, POLICY) == 5  # not 6: 5.0000000001 is 5
    shown = public(busy, POLICY)
    assert shown["desired_daemons"] == 5
    assert shown["per_daemon_per_s"] == 20.0
    assert shown["backlog"] == 1000


def test_the_jobs_running_and_the_arrivals_keep_their_slots() -> None:
    # 30 jobs a second of half a second each keep 15 slots busy: 1.5 daemons of 10 slots.
    steady = load(arrived=30 * 60, finished=30 * 60)
    assert steady.arrival_per_s == 30.0
    assert steady.needed == pytest.approx(1.5)
    assert desired_daemons(steady, POLICY) == 2
    # 25 jobs running now count too, when more than the arrivals keep busy.
    running = load(arrived=30 * 60, active=25)
    assert running.needed == pytest.approx(2.5)


def test_arrivals_beyond_capacity_never_drain_and_ask_for_more_up_to_max() -> None:
    flooded = load(queued=500, arrived=300 * 60, finished=40 * 60, daemons=2)
    assert drain_s(flooded) is None
    assert public(flooded, POLICY)["drain_s"] is None
    assert flooded.needed == pytest.approx(17.5)
    assert desired_daemons(flooded, POLICY) == math.ceil(flooded.needed)
    assert desired_daemons(flooded, AutoscaleConfig(max_daemons=4)) == 4


def test_drain_time_is_the_backlog_over_the_net_rate() -> None:
    draining = load(queued=120, arrived=10 * 60, finished=40 * 60)
    assert drain_s(draining) == pytest.approx(4.0)


def test_with_no_live_daemon_a_backlog_asks_for_one() -> None:
    orphaned = load(queued=50, daemons=0)
    assert orphaned.per_daemon_per_s is None
    assert orphaned.needed is None
    assert desired_daemons(orphaned, POLICY) == 1
    assert desired_daemons(orphaned, AutoscaleConfig(min_daemons=3)) == 3
    assert load(daemons=0).needed == 0.0  # and no work, none


def test_before_any_job_has_finished_the_hint_keeps_the_daemons_there_are() -> None:
    fresh = load(queued=500, daemons=3, mean_run_ms=None)
    assert fresh.needed is None
    assert desired_daemons(fresh, POLICY) == 3
    # Without a backlog, the jobs running now are all it can size: 4 of 2 slots a daemon.
    assert load(active=4, concurrency=2, mean_run_ms=None).needed == 2.0


def test_a_paused_queue_needs_slots_only_for_what_runs() -> None:
    paused = load(queued=10_000, active=10, paused=True)
    assert paused.backlog == 10_000
    assert paused.needed == 1.0


def test_a_queue_no_daemon_serves_is_sized_with_the_live_daemons() -> None:
    others = [daemon(1, concurrency=4, queues=("other",))]
    unserved = queue_load(
        queued=100, active=0, rates=rates(), serving=[], live=others, target_drain_s=10.0
    )
    assert unserved.daemons == 0
    assert unserved.per_daemon_per_s == 8.0
    assert unserved.needed == pytest.approx(100 * 0.5 / 10 / 4)


def test_the_fleet_needs_the_sum_of_its_queues() -> None:
    live = [daemon(1), daemon(2)]
    one, two = load(queued=1000), load(arrived=30 * 60)
    fleet = fleet_load([one, two], live)
    assert fleet.needed == pytest.approx(6.5)
    assert (fleet.backlog, fleet.daemons) == (1000, 2)
    shown = public(fleet, POLICY, fleet=True)
    assert shown["desired_daemons"] == 7
    assert shown["target_drain_s"] == 10.0
    assert "per_daemon_per_s" not in shown
    unknown = fleet_load([one, load(queued=5, mean_run_ms=None, daemons=2)], live)
    assert unknown.needed is None
    assert desired_daemons(unknown, POLICY) == 2


# The rates, as the inspector reads them from Redis


async def test_rates_count_arrivals_ends_due_jobs_and_run_times(
    store: Store, inspector: Inspector
) -> None:
    clock = Clock(now=1_000_000_000_003)
    jobs = [new_job(created_at=clock.now, idempotency_key=f"k{n}") for n in range(4)]
    for job in jobs:
        await store.enqueue(job)
    # A repeated submission adds no job, and no arrival.
    await store.enqueue(new_job(created_at=clock.now, idempotency_key="k0"))
    late = new_job(created_at=clock.now, run_at=clock.now - 1)
    await store.enqueue(late)
    claimed = (await store.claim(Q, "d", 2, clock.now, type_limits=ECHO)).jobs
    finished = [ended(job, "completed", "1", finished_at=clock.now + 300) for job in claimed]
    await store.ack(Q, "d", finished, clock.now + 300)

    found = (await inspector.queue_rates([Q], clock.now + 300))[Q]
    assert (found.arrived, found.finished, found.due) == (5, 2, 1)
    assert found.mean_run_ms == 300.0
    assert found.window_ms == MINUTE_MS + 303
    assert not found.paused
    # A minute and a bucket later, they have left the window.
    later = (await inspector.queue_rates([Q], clock.now + MINUTE_MS + 10_000))[Q]
    assert (later.arrived, later.finished) == (0, 0)


async def test_rates_of_a_queue_with_no_data(inspector: Inspector) -> None:
    found = (await inspector.queue_rates(["empty"], 1_000_000))["empty"]
    assert found == Rates(0, 0, MINUTE_MS, 0, None, False)


# A real daemon's /stats and /metrics


@pytest.mark.timeout(150)
async def test_a_backlog_shows_in_stats_and_metrics_until_it_is_drained(
    daemon_api: DaemonApi,
) -> None:
    autoscale = {"target_drain_s": 1, "max_daemons": 4}
    async with daemon_api(workers={"concurrency": 2}, autoscale=autoscale) as (_, api):
        session, url = api
        for _ in range(40):
            status, _ = await post_json(
                session, f"{url}/jobs", {"type": "sleep", "payload": {"seconds": 0.5}}
            )
            assert status == 201
        hint: dict[str, object] = {}

        async def sized() -> bool:
            nonlocal hint
            _, stats = await get_json(session, f"{url}/stats")
            hint = stats["autoscale"]
            # Once a job has finished its run time is known: 2 slots, half a second a job,
            # and 14 jobs or more to drain in a second ask for the 4 daemons allowed.
            return stats["queues"][Q]["autoscale"]["per_daemon_per_s"] is not None

        await wait_until(sized, "the hint to know a run time")
        queue_hint = (await get_json(session, f"{url}/stats"))[1]["queues"][Q]["autoscale"]
        assert 0 < queue_hint["per_daemon_per_s"] <= 2 / 0.5
        assert queue_hint["daemons"] == 1
        assert hint["daemons"] == 1
        assert (hint["target_drain_s"], hint["min_daemons"], hint["max_daemons"]) == (1.0, 1, 4)

        async def metric() -> float:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            return families["taskd_autoscale_desired_daemons"].samples[0].value

        async def at_most() -> bool:
            _, stats = await get_json(session, f"{url}/stats")
            return bool(stats["autoscale"]["desired_daemons"] == 4) and await metric() == 4

        await wait_until(at_most, "the hint to ask for max_daemons")

        async def drained() -> bool:
            _, stats = await get_json(session, f"{url}/stats")
            shown = stats["autoscale"]
            return bool(shown["backlog"] == 0 and shown["desired_daemons"] == 1)

        await wait_until(drained, "the backlog to drain and the hint to fall to 1", deadline=60)
        _, stats = await get_json(session, f"{url}/stats")
        assert stats["autoscale"]["drain_s"] == 0.0
        assert stats["autoscale"]["arrival_per_s"] > 0  # the 40 jobs, over the last minute
        assert await metric() == 1


# The KEDA example, read as YAML without a YAML library (PyYAML is no dependency of
# taskd's): the block-style subset it is written in, mappings, lists and plain scalars.

KEDA = REPO / "config" / "keda" / "scaledobject.yaml"


def yaml_subset(text: str) -> Any:
    """Block mappings and `- ` lists of them, scalars plain or double-quoted; comments
    dropped. Anything else (flow style, anchors, tabs, odd indents): ValueError."""
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        _require("\t" not in raw, f"a tab in {raw!r}")
        content = re.sub(r"\s+#.*$", "", raw) if not raw.lstrip().startswith("#") else ""
        if content.strip():
            lines.append((len(content) - len(content.lstrip()), content.strip()))
    value, rest = _block(lines, 0)
    _require(not rest, f"left over: {rest}")
    return value


def _block(lines: list[tuple[int, str]], indent: int) -> tuple[Any, list[tuple[int, str]]]:
    if lines and lines[0][0] == indent and lines[0][1].startswith("- "):
        items = []
        while lines and lines[0][0] == indent and lines[0][1].startswith("- "):
            # "- key: value" opens a mapping whose keys sit two columns further in.
            lines = [(indent + 2, lines[0][1][2:]), *lines[1:]]
            item, lines = _block(lines, indent + 2)
            items.append(item)
        return items, lines
    mapping: dict[str, Any] = {}
    while lines and lines[0][0] == indent:
        key, sep, value = lines[0][1].partition(":")
        _require(bool(sep and re.fullmatch(r"[A-Za-z_][\w.-]*", key)), f"no key: {lines[0]}")
        _require(key not in mapping, f"{key} twice")
        lines = lines[1:]
        if value.strip():
            mapping[key] = _scalar(value.strip())
        else:
            _require(bool(lines) and lines[0][0] > indent, f"{key}: no value")
            mapping[key], lines = _block(lines, lines[0][0])
    _require(not lines or lines[0][0] < indent, f"bad indent at {lines[:1]}")
    return mapping, lines


def _require(holds: bool, problem: str) -> None:
    if not holds:
        raise ValueError(problem)


def _scalar(text: str) -> Any:
    if text.startswith('"'):
        _require(text.endswith('"') and len(text) > 1, text)
        return text[1:-1]
    _require(text[0] not in "[{&*!|>'%@`", f"not a plain scalar: {text!r}")
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def test_the_keda_example_scales_on_the_gauge_within_the_default_bounds() -> None:
    scaled = yaml_subset(KEDA.read_text())
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"name": "taskd"}
    policy = AutoscaleConfig()
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        policy.min_daemons,
        policy.max_daemons,
    )
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == policy.cooldown_down_s
    [trigger] = spec["triggers"]
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
    assert trigger["metadata"]["query"] == "max(taskd_autoscale_desired_daemons)"
    assert trigger["metadata"]["threshold"] == "1"
    assert trigger["metadata"]["serverAddress"].startswith("http://")
    # The gauge it asks for is one the daemons export.
    assert "taskd_autoscale_desired_daemons" in Metrics(concurrency=1).render()[0].decode()


def test_the_yaml_reader_refuses_what_it_does_not_know() -> None:
    assert yaml_subset('a:\n  b: 1\n  c:\n    - d: x\n      e: "2"\n') == {
        "a": {"b": 1, "c": [{"d": "x", "e": "2"}]}
    }
    for bad in ("a: [1, 2]\n", "a:\n\tb: 1\n", "a: 1\n  b: 2\n", "a: 1\na: 2\n", "a: &x 1\n"):
        with pytest.raises(ValueError, match=r"tab|twice|indent|scalar|left over"):
            yaml_subset(bad)
