"""The [tracing] table, checked, with the standard OTEL_* environment variables over it.

Tracing is on when the file has a [tracing] table (`[tracing]` alone will do with an
endpoint in the environment), and off with OTEL_SDK_DISABLED=true. The variables are not
enough by themselves: they are often set for every program of a machine, and a daemon must
not start sending spans, or refuse to start for want of the otel extra, because of them.
Where both give a value, the variable wins, as TASKD_REDIS_URL does over [redis] url:
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT  the whole URL spans go to, used as it is; else
  OTEL_EXPORTER_OTLP_ENDPOINT         a base URL, as otlp_endpoint: /v1/traces is added
  OTEL_SERVICE_NAME                   over service_name
  OTEL_TRACES_SAMPLER                 the sampler (default parentbased_traceidratio)
  OTEL_TRACES_SAMPLER_ARG             over sample_ratio
The SDK reads the exporter's and the batch's other variables itself (headers, timeout,
compression, certificates, OTEL_BSP_*, OTEL_RESOURCE_ATTRIBUTES).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from urllib.parse import urlsplit

from taskd.config.model import TracingConfig
from taskd.config.tables import Table, describe
from taskd.config.urls import redact

TRACES_PATH = "v1/traces"
# The samplers of OTEL_TRACES_SAMPLER taskd builds (taskd.tracing); the *traceidratio ones
# take the ratio.
SAMPLERS = (
    "always_on", "always_off", "traceidratio",
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
)  # fmt: skip
DEFAULT_SAMPLER = "parentbased_traceidratio"
# What the otel extra installs, as imported.
_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")


def read_tracing(t: Table, env: Mapping[str, str], *, present: bool) -> TracingConfig:
    """The [tracing] table `t` (`present`: the file has one) and the OTEL_* variables."""
    endpoint = _endpoint(t)
    service_name = t.string("service_name")
    if "service_name" not in t.bad and not service_name.strip():
        t.problem("service_name", "must not be empty")
    ratio = _ratio(t, t.data.get("sample_ratio", t.default("sample_ratio")), "")
    if not present or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return TracingConfig()
    traces_url = _traces_url(t, endpoint, env)
    if env.get("OTEL_SERVICE_NAME", "").strip():
        service_name = env["OTEL_SERVICE_NAME"].strip()
    if env.get("OTEL_TRACES_SAMPLER_ARG", "").strip():
        raw = env["OTEL_TRACES_SAMPLER_ARG"].strip()
        ratio = _ratio(t, _number(raw), " (from OTEL_TRACES_SAMPLER_ARG)")
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        t.problem(
            "sample_ratio",
            f"taskd takes the samplers {', '.join(SAMPLERS)}, got {sampler!r}",
            suffix=" (from OTEL_TRACES_SAMPLER)",
        )
    if traces_url is not None and any(importlib.util.find_spec(m) is None for m in _MODULES):
        t.problem("otlp_endpoint", "tracing needs the otel extra: pip install 'taskd[otel]'")
    return TracingConfig(
        otlp_endpoint=endpoint,
        service_name=service_name,
        sample_ratio=ratio,
        traces_url=traces_url,
        sampler=sampler,
    )


def _endpoint(t: Table) -> str | None:
    endpoint = t.string("otlp_endpoint", default="") or None
    if endpoint is not None and (problem := _url_problem(endpoint, base=True)):
        t.problem("otlp_endpoint", problem)
    return endpoint


def _traces_url(t: Table, endpoint: str | None, env: Mapping[str, str]) -> str | None:
    """Where spans go: the traces variable as it is, else a base URL with TRACES_PATH."""
    for name, base in (
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", False),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", True),
    ):
        value = env.get(name, "").strip()
        if value:
            if problem := _url_problem(value, base=base):
                t.problem("otlp_endpoint", problem, suffix=f" (from {name})")
            return _under(value) if base else value
    if endpoint is None:
        if "otlp_endpoint" not in t.bad:
            t.problem(
                "otlp_endpoint",
                'is required: the collector\'s OTLP/HTTP address, e.g. "http://jaeger:4318" '
                "(or OTEL_EXPORTER_OTLP_ENDPOINT)",
            )
        return None
    return _under(endpoint)


def _under(base: str) -> str:
    return base + TRACES_PATH if base.endswith("/") else f"{base}/{TRACES_PATH}"


def _url_problem(url: str, *, base: bool) -> str | None:
    shown = redact(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        return f"invalid URL {shown!r}: {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL (OTLP/HTTP, port 4318), got {shown!r}"
    if base and parts.path.rstrip("/").endswith("/" + TRACES_PATH):
        return f"give the base URL (taskd adds /{TRACES_PATH}), got {shown!r}"
    return None


def _number(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _ratio(t: Table, value: object, origin: str) -> float:
    """A share from 0 to 1, or the default (noting the problem)."""
    default: float = t.default("sample_ratio")
    if isinstance(value, bool) or not isinstance(value, int | float):
        shown = describe(value)
        t.problem("sample_ratio", f"must be a number from 0 to 1, got {shown}", suffix=origin)
        return default
    if not (math.isfinite(value) and 0 <= value <= 1):
        t.problem("sample_ratio", f"must be a number from 0 to 1, got {value}", suffix=origin)
        return default
    return float(value)
