"""Prometheus metrics: what Metrics exports, and that the alert rules and dashboard match it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import taskd
from taskd.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "config" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "taskd.json"

# A metric name in a PromQL expression.
METRIC_NAME = re.compile(r"\btaskd_[a-z_]+\b")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus)",
)


def samples(metrics: Metrics) -> list[Sample]:
    """Every sample of a render(), parsed back as Prometheus would read it."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of the sample with exactly this name and these labels; None if absent."""
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


def depths(metrics: Metrics) -> dict[tuple[str, str], float]:
    """taskd_queue_jobs by (queue, state)."""
    return {
        (s.labels["queue"], s.labels["state"]): s.value
        for s in samples(metrics)
        if s.name == "taskd_queue_jobs"
    }


def busy_metrics() -> Metrics:
    """A Metrics on which every method has been called, so every series exists."""
    m = Metrics(concurrency=8)
    m.enqueued("default", "echo", 3)
    m.started("default", "echo", 0.004)
    for outcome in ("completed", "retry", "failed", "cancelled"):
        m.finished("default", "echo", outcome, 0.02)
    m.recovered("default", 2)
    m.limited("default", 2, 1)
    m.set_active(5)
    counts = {"queued": 1, "totals": {"enqueued": 3}, "callbacks_pending": 4}
    m.set_cluster({"default": counts}, live_daemons=2)
    m.set_without_handler({"default": {"resize": {"job": "j", "wait_ms": 1500}}})
    return m


def test_counters_count_per_queue_and_type() -> None:
    m = Metrics(concurrency=4)
    m.enqueued("default", "echo")
    m.enqueued("default", "echo", 2)
    m.enqueued("images", "resize")
    m.finished("default", "echo", "completed", 0.01)
    m.finished("default", "echo", "completed", 0.01)
    m.finished("default", "echo", "retry", 0.01)
    m.finished("images", "resize", "failed", 1.5)
    m.finished("images", "resize", "cancelled", 0.1)
    m.recovered("images", 4)

    def total(name: str, **labels: str) -> float | None:
        return value(m, f"taskd_jobs_{name}_total", **labels)

    assert total("enqueued", queue="default", type="echo") == 3
    assert total("enqueued", queue="images", type="resize") == 1
    assert total("completed", queue="default", type="echo") == 2
    assert total("retried", queue="default", type="echo") == 1
    assert total("failed", queue="images", type="resize") == 1
    assert total("cancelled", queue="images", type="resize") == 1
    assert total("recovered", queue="images") == 4
    # Every outcome of a seen (queue, type) exists at 0, so ratios have both sides.
    assert total("failed", queue="default", type="echo") == 0
    assert total("completed", queue="images", type="resize") == 0


def test_unknown_outcome_is_an_error() -> None:
    with pytest.raises(ValueError, match="lost"):
        Metrics(concurrency=1).finished("default", "echo", "lost", 0.1)


def test_histograms_observe_wait_and_run_times() -> None:
    m = Metrics(concurrency=4)
    m.started("default", "echo", 0.003)
    m.started("default", "sleep", 45.0)
    m.finished("default", "sleep", "completed", 700.0)

    wait = {"queue": "default"}
    assert value(m, "taskd_job_wait_seconds_count", **wait) == 2
    assert value(m, "taskd_job_wait_seconds_sum", **wait) == pytest.approx(45.003)
    assert value(m, "taskd_job_wait_seconds_bucket", le="0.001", **wait) == 0
    assert value(m, "taskd_job_wait_seconds_bucket", le="0.005", **wait) == 1
    assert value(m, "taskd_job_wait_seconds_bucket", le="60.0", **wait) == 2
    run = {"queue": "default", "type": "sleep"}
    assert value(m, "taskd_job_run_seconds_bucket", le="600.0", **run) == 0
    assert value(m, "taskd_job_run_seconds_bucket", le="+Inf", **run) == 1
    # Buckets from 1 ms to 10 minutes.
    les = {s.labels["le"] for s in samples(m) if s.name == "taskd_job_run_seconds_bucket"}
    assert min(float(le) for le in les) == 0.001
    assert max(float(le) for le in les - {"+Inf"}) == 600


def test_gauges_and_build_info() -> None:
    m = Metrics(concurrency=16)
    m.set_active(7)
    assert value(m, "taskd_daemon_concurrency") == 16
    assert value(m, "taskd_daemon_active_jobs") == 7
    assert value(m, "taskd_build_info", version=taskd.__version__) == 1


def test_set_cluster_sets_int_states_and_removes_vanished_queues() -> None:
    m = Metrics(concurrency=4)
    totals = {"enqueued": 9, "completed": 3}
    m.set_cluster(
        {
            "default": {"queued": 5, "scheduled": 1, "active": 2, "completed": 3, "totals": totals},
            "images": {"queued": 8, "failed": 1, "totals": {}},
        },
        live_daemons=3,
    )
    assert depths(m) == {
        ("default", "queued"): 5,
        ("default", "scheduled"): 1,
        ("default", "active"): 2,
        ("default", "completed"): 3,
        ("images", "queued"): 8,
        ("images", "failed"): 1,
    }
    assert value(m, "taskd_daemons_live") == 3
    # Recovery counters exist at 0 before the first recovery, so increase() sees it.
    assert value(m, "taskd_jobs_recovered_total", queue="images") == 0

    m.set_cluster({"default": {"queued": 0, "active": 1}}, live_daemons=1)
    assert depths(m) == {("default", "queued"): 0, ("default", "active"): 1}
    assert value(m, "taskd_daemons_live") == 1


def test_jobs_without_handler_come_and_go_per_queue_and_type() -> None:
    m = Metrics(concurrency=4)
    m.set_without_handler({"default": {"resize": {"job": "j", "wait_ms": 2500}}, "other": {}})
    assert (
        value(m, "taskd_jobs_without_handler_wait_seconds", queue="default", type="resize") == 2.5
    )
    m.set_without_handler({"default": {}, "other": {}})  # a daemon with the handler came
    assert not [s for s in samples(m) if s.name == "taskd_jobs_without_handler_wait_seconds"]


def test_callbacks_pending_and_limit_waits() -> None:
    m = Metrics(concurrency=4)
    m.set_cluster({"hooks": {"queued": 0, "callbacks_pending": 12, "totals": {}}}, 1)
    assert value(m, "taskd_callbacks_pending", queue="hooks") == 12
    assert ("hooks", "callbacks_pending") not in depths(m)  # not a job state
    m.limited("hooks", rate=3, concurrency=0)
    m.limited("hooks", rate=1, concurrency=2)
    assert value(m, "taskd_job_limit_waits_total", queue="hooks", limit="rate_limit") == 4
    assert value(m, "taskd_job_limit_waits_total", queue="hooks", limit="concurrency") == 2


def test_job_types_exist_at_zero_from_the_start() -> None:
    m = Metrics(concurrency=4, job_types=[("images", "resize")])
    labels = {"queue": "images", "type": "resize"}
    for name in ("enqueued", "completed", "retried", "failed", "cancelled"):
        assert value(m, f"taskd_jobs_{name}_total", **labels) == 0
    assert value(m, "taskd_job_run_seconds_count", **labels) == 0


def test_instances_do_not_share_registries() -> None:
    a, b = Metrics(concurrency=1), Metrics(concurrency=2)
    a.enqueued("default", "echo", 5)
    a.set_cluster({"default": {"queued": 5}}, live_daemons=1)
    assert a.registry is not b.registry
    assert value(b, "taskd_jobs_enqueued_total", queue="default", type="echo") is None
    assert value(b, "taskd_queue_jobs", queue="default", state="queued") is None
    assert value(a, "taskd_daemon_concurrency") == 1
    assert value(b, "taskd_daemon_concurrency") == 2


def exported_names() -> set[str]:
    """Names of every series Metrics can export (with _total, _bucket, _info...)."""
    return {s.name for s in samples(busy_metrics())}


def test_exported_names_follow_conventions() -> None:
    names = exported_names()
    assert all(name.startswith("taskd_") for name in names)
    assert {
        "taskd_jobs_enqueued_total",
        "taskd_jobs_completed_total",
        "taskd_jobs_retried_total",
        "taskd_jobs_failed_total",
        "taskd_jobs_cancelled_total",
        "taskd_jobs_recovered_total",
        "taskd_job_limit_waits_total",
        "taskd_callbacks_pending",
        "taskd_job_wait_seconds_bucket",
        "taskd_job_run_seconds_bucket",
        "taskd_queue_jobs",
        "taskd_daemon_active_jobs",
        "taskd_daemon_concurrency",
        "taskd_daemons_live",
        "taskd_jobs_without_handler_wait_seconds",
        "taskd_redis_data_lost_total",
        "taskd_attempts_lost_total",
        "taskd_build_info",
    } <= names


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, including those inside rows."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_dashboard_queries_use_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    exprs = dashboard_exprs()
    assert len(exprs) >= 7
    names = exported_names()
    for expr in exprs:
        used = METRIC_NAME.findall(expr)
        assert used, expr
        assert set(used) <= names, f"{expr}: {set(used) - names} is not exported"
    for panel in panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_alert_rules_use_exported_metrics() -> None:
    # Comments may name families loosely (taskd_jobs_*_total); rules and annotations may not.
    lines = [line for line in ALERTS.read_text().splitlines() if not line.lstrip().startswith("#")]
    used = set(METRIC_NAME.findall("\n".join(lines)))
    assert used
    assert used <= exported_names(), used - exported_names()


def promtool(*args: str) -> None:
    done = subprocess.run(
        ["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


@needs_promtool
def test_alert_rules_are_valid() -> None:
    promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    promtool("test", "rules", str(ALERT_TESTS))


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses PromQL only in rule files: make each query a recording rule, with
    # Grafana's variables replaced by what they expand to. JSON is valid YAML.
    rules = [
        {
            "record": f"taskd:dashboard_query_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$queue", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))
