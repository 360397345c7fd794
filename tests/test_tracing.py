"""Tracing: a job's spans from its submitter to its handler, the context handed on to
handlers and callbacks, the OTLP/HTTP export to a real receiver, and with tracing off no
OpenTelemetry at all."""

from __future__ import annotations

import ast
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis
from standardwebhooks import Webhook

from taskd import tracing as tracing_module
from taskd.client import AsyncClient, TraceContext
from taskd.config import ScheduleConfig, TracingConfig, parse
from taskd.scheduler import Scheduler
from taskd.store import Keys, Store
from taskd.tracing import Tracing, sampler
from taskd.validation import ApiError, parse_batch, parse_submission, trace_context
from tests.builders import Clock, new_job, stored, write_daemon_config
from tests.support import (
    BUILTINS,
    REPO,
    DaemonProcess,
    base_url,
    make_config,
    running_daemon,
    wait_for_state,
    wait_healthy,
    wait_until,
)
from tests.test_docs import Shell, blocks_named, user_env
from tests.test_handlers import PROGRAMS
from tests.test_signing import SECRET_A, Receiver, receiver  # noqa: F401 (a fixture)

# The submitter's trace context, as W3C headers carry it.
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
CLIENT = {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}
# Another submitter's.
OTHER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_SPAN = "00f067aa0ba902b7"
OTHER = f"00-{OTHER_TRACE}-{OTHER_SPAN}-01"
HANDLERS = parse({"handlers": BUILTINS}, env={}).handlers


@pytest.fixture(scope="session")
def _memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    """One provider for the test process, OpenTelemetry's global one: it takes one only
    once, and a Python handler's own spans go to it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider, exporter


@pytest.fixture
def spans(_memory: tuple[TracerProvider, InMemorySpanExporter]) -> InMemorySpanExporter:
    """The spans ended during the test."""
    _memory[1].clear()
    return _memory[1]


@pytest.fixture
def tracing(_memory: tuple[TracerProvider, InMemorySpanExporter]) -> Tracing:
    return Tracing(provider=_memory[0])


@asynccontextmanager
async def traced_daemon(
    redis_url: str, tracing: Tracing, **sections: Mapping[str, Any]
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A daemon with tracing on the clean database, a session, and its base URL."""
    async with (
        running_daemon(make_config(redis_url, **sections), tracing) as daemon,
        aiohttp.ClientSession() as session,
    ):
        yield session, base_url(daemon)


async def submit(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    path: str = "/jobs",
) -> Any:
    async with session.post(f"{url}{path}", json=body, headers=headers) as response:
        answer = await response.json()
        assert response.status == 201, answer
        return answer


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


async def finished(spans: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    """The spans named `name`, once `count` of them have ended, in the order they ended."""

    async def ended() -> bool:
        return len(named(spans, name)) >= count

    await wait_until(ended, f"{count} spans {name!r}")
    found = named(spans, name)
    assert len(found) == count, found
    return found


def trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{trace_id(span)}-{span_id(span)}-{span.context.trace_flags:02x}"


def sampled(traceparent: str) -> bool:
    """Whether a traceparent's flags say its trace is recorded."""
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)


def of_job(found: list[ReadableSpan], job_id: str) -> ReadableSpan:
    [span] = [s for s in found if s.attributes and s.attributes["taskd.job.id"] == job_id]
    return span


# A job's spans, from its submitter to its attempts


async def test_a_job_is_a_submission_span_under_the_clients_and_an_attempt_span_under_that(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    async with traced_daemon(redis_url, tracing) as (session, url):
        job = await submit(session, url, {"type": "echo", "payload": 1}, CLIENT)
        done = await wait_for_state(session, url, job["id"], {"completed"})
    [submission] = await finished(spans, "taskd.submit echo")
    [attempt] = await finished(spans, "taskd.job echo")
    assert (submission.kind, attempt.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert trace_id(submission) == trace_id(attempt) == CLIENT_TRACE
    assert parent_id(submission) == CLIENT_SPAN
    assert parent_id(attempt) == span_id(submission)
    assert attempt.context is not None
    assert attempt.context.trace_state.get("vendor") == "opaque"
    job_attributes = {
        "messaging.system": "taskd",
        "messaging.destination.name": "default",
        "messaging.message.id": job["id"],
        "taskd.job.id": job["id"],
        "taskd.job.type": "echo",
    }
    assert submission.attributes == {**job_attributes, "messaging.operation.type": "send"}
    assert attempt.attributes is not None
    attributes = dict(attempt.attributes)
    assert isinstance(attributes.pop("taskd.job.wait_ms"), int)  # some ms, whatever they are
    assert attributes == {
        **job_attributes,
        "messaging.operation.type": "process",
        "taskd.job.attempt": 1,
        "taskd.daemon": done["daemon"],
        "taskd.job.outcome": "completed",
    }
    assert attempt.status.status_code == StatusCode.UNSET


async def test_the_python_clients_trace_argument_is_the_submissions_parent(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    async with traced_daemon(redis_url, tracing) as (_, url), AsyncClient(url) as client:
        job = await client.submit("echo", 1, trace=TraceContext(traceparent=CLIENT["traceparent"]))
        await client.wait(job["id"], timeout=30)
    [submission] = await finished(spans, "taskd.submit echo")
    assert (trace_id(submission), parent_id(submission)) == (CLIENT_TRACE, CLIENT_SPAN)


async def test_a_submission_without_a_traceparent_starts_a_trace(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    async with traced_daemon(redis_url, tracing) as (session, url):
        job = await submit(session, url, {"type": "echo"})
        await wait_for_state(session, url, job["id"], {"completed"})
    [submission] = await finished(spans, "taskd.submit echo")
    [attempt] = await finished(spans, "taskd.job echo")
    assert submission.parent is None
    assert trace_id(attempt) == trace_id(submission)
    assert parent_id(attempt) == span_id(submission)


# Broken as W3C Trace Context tells apart: each is ignored, and its tracestate with it.
INVALID = [
    f"00-{'0' * 32}-{CLIENT_SPAN}-01",  # trace id all zeros
    f"00-{CLIENT_TRACE}-{'0' * 16}-01",  # span id all zeros
    f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",  # version ff
    f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",  # upper case
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-more",  # version 00 has four fields
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN[:-2]}-01",  # span id too short
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}",  # no flags
    "not a traceparent",
    "0" * 600,
]


async def test_an_invalid_traceparent_is_ignored_never_refused(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    async with traced_daemon(redis_url, tracing) as (session, url):
        ids = []
        for value in INVALID:
            headers = {"traceparent": value, "tracestate": "vendor=opaque"}
            ids.append((await submit(session, url, {"type": "noop"}, headers))["id"])
        # Sent twice, a valid one is no longer: which should win?
        twice = [("traceparent", TRACEPARENT), ("traceparent", OTHER)]
        async with session.post(f"{url}/jobs", json={"type": "noop"}, headers=twice) as response:
            assert response.status == 201
            ids.append((await response.json())["id"])
    submissions = await finished(spans, "taskd.submit noop", len(ids))
    for job_id in ids:
        span = of_job(submissions, job_id)
        assert span.parent is None, job_id
        assert trace_id(span) not in (CLIENT_TRACE, OTHER_TRACE)
        assert span.context is not None
        assert not span.context.trace_state


async def test_each_job_of_a_batch_has_its_own_trace_field_or_else_the_requests(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    jobs = [
        {"type": "echo", "trace": {"traceparent": OTHER, "tracestate": "other=1"}},
        {"type": "echo"},
        {"type": "echo", "trace": {"traceparent": "00-broken"}},  # its own: a new trace
        {"type": "echo", "trace": None},  # as good as none
    ]
    async with traced_daemon(redis_url, tracing) as (session, url):
        ids = (await submit(session, url, {"jobs": jobs}, CLIENT, "/jobs/batch"))["ids"]
        for job_id in ids:
            await wait_for_state(session, url, job_id, {"completed"})
    submissions = await finished(spans, "taskd.submit echo", 4)
    own, default, broken, none = (of_job(submissions, job_id) for job_id in ids)
    assert (trace_id(own), parent_id(own)) == (OTHER_TRACE, OTHER_SPAN)
    assert own.context is not None
    assert own.context.trace_state.get("other") == "1"
    assert (trace_id(default), parent_id(default)) == (CLIENT_TRACE, CLIENT_SPAN)
    assert (trace_id(none), parent_id(none)) == (CLIENT_TRACE, CLIENT_SPAN)
    assert broken.parent is None
    assert trace_id(broken) != CLIENT_TRACE
    attempts = await finished(spans, "taskd.job echo", 4)
    for job_id, submission in zip(ids, (own, default, broken, none), strict=True):
        assert parent_id(of_job(attempts, job_id)) == span_id(submission)


async def test_a_retry_is_a_second_attempt_span_in_the_same_trace(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    flaky = {"builtin": "fail", "max_attempts": 2, "backoff_base": 0.05, "backoff_max": 0.05}
    async with traced_daemon(redis_url, tracing, handlers={"flaky": flaky}) as (session, url):
        job = await submit(session, url, {"type": "flaky", "payload": {"message": "nope"}}, CLIENT)
        await wait_for_state(session, url, job["id"], {"failed"})
    [submission] = await finished(spans, "taskd.submit flaky")
    first, second = await finished(spans, "taskd.job flaky", 2)
    for attempt, number, outcome in ((first, 1, "retry"), (second, 2, "failed")):
        assert trace_id(attempt) == CLIENT_TRACE
        assert parent_id(attempt) == span_id(submission)
        assert attempt.attributes is not None
        assert attempt.attributes["taskd.job.attempt"] == number
        assert attempt.attributes["taskd.job.outcome"] == outcome
        assert (attempt.status.status_code, attempt.status.description) == (
            StatusCode.ERROR,
            "nope",
        )


async def test_a_scheduled_tick_starts_a_trace_that_its_job_carries(
    store: Store, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    # 5 s past a minute: the tick of "* * * * *" at the minute is due, and not missed.
    clock = Clock(1_800_000_000_000 + 5_000)
    schedule = ScheduleConfig(name="every-minute", cron="* * * * *", type="echo")
    scheduler = Scheduler(
        store=store, schedules=[schedule], handler_configs=HANDLERS, clock=clock, tracing=tracing
    )
    await scheduler.tick()
    [tick] = named(spans, "taskd.schedule every-minute")
    assert (tick.kind, tick.parent) == (SpanKind.PRODUCER, None)
    assert tick.attributes is not None
    job = await stored(store, str(tick.attributes["taskd.job.id"]))
    assert job.trace == traceparent_of(tick)


# The context handed on: Python handlers' spans, exec's environment, HTTP requests


@pytest.mark.parametrize("function", ["traced", "traced_sync"])
async def test_a_python_handlers_own_span_nests_under_its_attempt(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter, function: str
) -> None:
    handlers = {"traced": {"python": f"tests.handler_funcs:{function}"}}
    async with traced_daemon(redis_url, tracing, handlers=handlers) as (session, url):
        job = await submit(session, url, {"type": "traced"}, CLIENT)
        done = await wait_for_state(session, url, job["id"], {"completed"})
    [attempt] = await finished(spans, "taskd.job traced")
    [own] = await finished(spans, "handler's own work")
    assert done["result"] == {"trace_id": CLIENT_TRACE, "span_id": span_id(own)}
    assert parent_id(own) == span_id(attempt)


async def test_an_exec_program_gets_its_attempts_trace_context_in_its_environment(
    redis_url: str, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    handlers = {"env": {"exec": [sys.executable, str(PROGRAMS / "show_env.py")]}}
    async with traced_daemon(redis_url, tracing, handlers=handlers) as (session, url):
        job = await submit(session, url, {"type": "env"}, CLIENT)
        done = await wait_for_state(session, url, job["id"], {"completed"})
    [attempt] = await finished(spans, "taskd.job env")
    assert done["result"]["TRACEPARENT"] == traceparent_of(attempt)
    assert done["result"]["TRACESTATE"] == "vendor=opaque"


async def test_http_handler_requests_and_callbacks_carry_their_spans_traceparent(
    redis_url: str,
    tracing: Tracing,
    spans: InMemorySpanExporter,
    receiver: Receiver,  # noqa: F811 (the fixture)
) -> None:
    sections: dict[str, Any] = {
        "handlers": {"hook": {"http": receiver.url()}},
        "server": {"signing_secrets": [SECRET_A]},
    }
    async with traced_daemon(redis_url, tracing, **sections) as (session, url):
        body = {"type": "hook", "callback_url": receiver.url()}
        job = await submit(session, url, body, CLIENT)
        await wait_for_state(session, url, job["id"], {"completed"})
        await wait_until(lambda: receiver.count(2), "the handler's request and the callback")
    [submission] = await finished(spans, "taskd.submit hook")
    [attempt] = await finished(spans, "taskd.job hook")
    [callback] = await finished(spans, "taskd.callback hook")
    handler_request, callback_request = receiver.requests
    assert "X-Taskd-Attempt" in handler_request.headers  # the handler's, not the callback
    assert handler_request.headers["traceparent"] == traceparent_of(attempt)
    assert callback_request.headers["traceparent"] == traceparent_of(callback)
    assert callback_request.headers["tracestate"] == "vendor=opaque"
    assert callback.kind == SpanKind.CLIENT
    assert parent_id(callback) == span_id(submission)
    assert callback.attributes is not None
    assert callback.attributes["server.address"] == "127.0.0.1"
    assert callback.status.status_code == StatusCode.UNSET
    # The signatures cover the bodies alone: the headers added change nothing.
    for request in receiver.requests:
        Webhook(SECRET_A).verify(request.body, dict(request.headers))


async def test_a_failed_callback_is_an_error_span(
    redis_url: str,
    tracing: Tracing,
    spans: InMemorySpanExporter,
    receiver: Receiver,  # noqa: F811 (the fixture)
) -> None:
    receiver.failures = 1  # the first delivery gets a 503, the second goes through
    async with traced_daemon(redis_url, tracing) as (session, url):
        job = await submit(session, url, {"type": "echo", "callback_url": receiver.url()})
        await wait_until(lambda: receiver.count(2), "the callback, sent again")
    failed, sent = await finished(spans, "taskd.callback echo", 2)
    assert (failed.status.status_code, failed.status.description) == (StatusCode.ERROR, "HTTP 503")
    assert sent.status.status_code == StatusCode.UNSET
    assert trace_id(failed) == trace_id(sent)
    assert failed.attributes is not None
    assert failed.attributes["taskd.job.id"] == job["id"]


# What a submission takes: the trace field's shape is checked, its values are W3C's


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize(
    ("trace_field", "message"),
    [
        (TRACEPARENT, "'trace' must be an object of the W3C strings traceparent and tracestate"),
        ({"traceparent": 1}, "'trace.traceparent' must be a string, got number"),
        ({"tracestate": ["a=b"]}, "'trace.tracestate' must be a string, got array"),
        ({"parent": TRACEPARENT}, "unknown field(s) in 'trace': parent;"),
    ],
)
def test_a_trace_field_of_another_shape_is_refused_whatever_the_config(
    traced: bool, trace_field: Any, message: str
) -> None:
    body = orjson.dumps({"type": "echo", "trace": trace_field})
    with pytest.raises(ApiError) as info:
        parse_submission(body, HANDLERS, 0, traced=traced)
    assert (info.value.status, info.value.code) == (422, "invalid_job")
    assert message in info.value.message
    batch = orjson.dumps({"jobs": [{"type": "echo"}, {"type": "echo", "trace": trace_field}]})
    with pytest.raises(ApiError, match=r"^jobs\[1\]: "):
        parse_batch(batch, HANDLERS, 0, 10, traced=traced)


def test_with_tracing_off_a_job_carries_no_trace() -> None:
    body = orjson.dumps({"type": "echo", "trace": {"traceparent": TRACEPARENT}})
    assert parse_submission(body, HANDLERS, 0, trace=OTHER).trace is None
    assert parse_submission(body, HANDLERS, 0, traced=True, trace=OTHER).trace == TRACEPARENT


@pytest.mark.parametrize(
    ("traceparent", "tracestate", "kept"),
    [
        (TRACEPARENT, None, TRACEPARENT),
        (f" {TRACEPARENT}\t", " a=1,b=2 ", f"{TRACEPARENT} a=1,b=2"),
        (TRACEPARENT, "", TRACEPARENT),
        (TRACEPARENT, "a=1\nb=2", TRACEPARENT),  # not a tracestate: dropped alone
        (f"00-{CLIENT_TRACE} -{CLIENT_SPAN}-01", "a=1", None),  # a space: no traceparent
        ("", "a=1", None),
        (None, "a=1", None),
        ("x" * 513, None, None),
    ],
)
def test_a_trace_context_is_kept_as_one_string_or_dropped(
    traceparent: str | None, tracestate: str | None, kept: str | None
) -> None:
    assert trace_context(traceparent, tracestate) == kept


# Sampling


def test_the_samplers_are_those_of_otel_traces_sampler() -> None:
    described = {
        name: sampler(TracingConfig(sample_ratio=0.25, sampler=name)).get_description()
        for name in ("traceidratio", "parentbased_traceidratio", "parentbased_always_off")
    }
    assert described["traceidratio"] == "TraceIdRatioBased{0.25}"
    assert described["parentbased_traceidratio"].startswith("ParentBased{root:TraceIdRatioBased")
    assert described["parentbased_always_off"].startswith("ParentBased{root:AlwaysOffSampler")


def test_a_job_is_recorded_as_its_submitters_trace_is() -> None:
    # Ratio 0 records no new trace; a submitter's sampled one still is, and an unrecorded
    # job still carries a context, which tells its attempts not to record either.
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler(TracingConfig(sample_ratio=0.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    unsampled = f"00-{OTHER_TRACE}-{OTHER_SPAN}-00"
    jobs = [new_job(trace=None), new_job(trace=TRACEPARENT), new_job(trace=unsampled)]
    with Tracing(provider=provider).submissions(jobs) as traced:
        pass
    [recorded] = exporter.get_finished_spans()
    assert trace_id(recorded) == CLIENT_TRACE
    fresh, followed, declined = (job.trace or "" for job in traced)
    assert [sampled(fresh), sampled(followed), sampled(declined)] == [False, True, False]
    assert followed == traceparent_of(recorded)
    assert declined.startswith(f"00-{OTHER_TRACE}-")
    provider.shutdown()


# Flushing at shutdown


class _Stuck(SpanProcessor):
    """A span processor whose flush and shutdown hang, as an export to a collector that
    does not answer does."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.release.wait(30)
        return True

    def shutdown(self) -> None:
        self.release.wait(30)


@pytest.fixture
def stuck(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tracing]:
    """Tracing to a collector that does not answer, given 1 s to flush."""
    monkeypatch.setattr(tracing_module, "FLUSH_TIMEOUT", 1.0)
    processor = _Stuck()
    provider = TracerProvider()
    provider.add_span_processor(processor)
    yield Tracing(provider=provider)
    processor.release.set()


async def test_a_collector_that_does_not_answer_does_not_hold_the_exit(
    stuck: Tracing, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    await stuck.flush()
    # Once a flush gave up, closing does not wait for the collector again.
    monkeypatch.setattr(tracing_module, "FLUSH_TIMEOUT", 30.0)
    await stuck.close()
    assert time.monotonic() - started < 15  # not the processor's 30 s


async def test_a_daemon_flushes_its_spans_before_it_deregisters(
    redis_url: str, redis: Redis, stuck: Tracing
) -> None:
    # The flush outlasts heartbeats (0.5 s apart here): a daemon deregistered before it
    # would register again, and stay registered once stopped.
    async with running_daemon(make_config(redis_url), stuck):
        assert await redis.zcard(Keys("taskd").daemons) == 1
    assert await redis.zcard(Keys("taskd").daemons) == 0


# Off: not one module of OpenTelemetry


NOTHING_IMPORTED = """
import asyncio, sys, traceback

# As if the otel extra were not installed; noting the code of taskd (or of its tests) that
# asks for it all the same. (redis-py asks too, and does without: not taskd's import.)
asked = []

class NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "opentelemetry":
            return None
        importer = [f for f in traceback.extract_stack() if not f.filename.startswith("<")][-1]
        if f"{sys.argv[3]}/taskd/" in importer.filename or "/tests/" in importer.filename:
            asked.append(f"{importer.filename}:{importer.lineno}: {name}")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoOpenTelemetry())

import aiohttp
from redis.asyncio import Redis

import taskd.cli
from taskd.store import Keys
from tests.support import base_url, make_config, running_daemon, wait_for_state

async def main(redis_url, traceparent, repo):
    ids = []
    async with (
        running_daemon(make_config(redis_url)) as daemon,
        aiohttp.ClientSession() as session,
    ):
        url, headers = base_url(daemon), {"traceparent": traceparent}
        body = {"type": "echo", "trace": {"traceparent": traceparent}}
        async with session.post(f"{url}/jobs", json=body, headers=headers) as response:
            ids.append((await response.json())["id"])
        batch = {"jobs": [body, {"type": "echo"}]}
        async with session.post(f"{url}/jobs/batch", json=batch, headers=headers) as response:
            ids += (await response.json())["ids"]
        for job_id in ids:
            await wait_for_state(session, url, job_id, {"completed"})
    async with Redis.from_url(redis_url) as redis:
        stored = [await redis.hgetall(Keys("taskd").job("default", i)) for i in ids]
    print(sorted({field.decode() for fields in stored for field in fields}))
    print(asked)
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry") or m == "taskd.tracing"))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_with_tracing_off_a_daemon_imports_no_opentelemetry_and_stores_no_trace(
    redis_url: str,
) -> None:
    args = [sys.executable, "-c", NOTHING_IMPORTED, redis_url, TRACEPARENT, str(REPO)]
    done = await anyio.run_process(args, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr.decode()
    fields, asked, imported = (ast.literal_eval(line) for line in done.stdout.decode().splitlines())
    assert "state" in fields
    assert "trace" not in fields
    assert asked == []
    assert imported == []


# The export over OTLP/HTTP, to a real receiver


@dataclass
class Collector:
    """An OTLP/HTTP receiver on a free port: what each POST /v1/traces carried."""

    base: str = ""
    exports: list[ExportTraceServiceRequest] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)

    async def traces(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        self.exports.append(ExportTraceServiceRequest.FromString(await request.read()))
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def spans(self) -> list[tuple[dict[str, Any], OtlpSpan]]:
        """Each span received, with its resource's attributes."""
        return [
            (_attributes(resource_spans.resource.attributes), span)
            for export in self.exports
            for resource_spans in export.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    received = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", received.traces)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()  # port 0: a free one
    received.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield received
    finally:
        await runner.cleanup()


async def test_a_daemon_sends_its_spans_over_otlp_http_when_it_stops(
    tmp_path: Path, free_port: Any, redis_url: str, collector: Collector
) -> None:
    """The documented [tracing] and submission, against a real OTLP/HTTP receiver."""
    [documented] = blocks_named("config", "tracing")
    tracing_table = documented.body.replace("http://jaeger:4318", collector.base)
    assert tracing_table != documented.body
    port = free_port()
    config = write_daemon_config(
        tmp_path / "taskd.toml", port, redis={"url": redis_url}, handlers={"echo": BUILTINS["echo"]}
    )
    config.write_text(config.read_text() + "\n" + tracing_table + "\n")
    env = {
        "OTEL_SERVICE_NAME": "from-the-environment",  # over the file's
        # A batch waits this long unless flushed: what arrives was sent at shutdown.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    daemon = DaemonProcess(["--config", str(config)], cwd=tmp_path, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, daemon)
        shell = Shell(f"127.0.0.1:{port}", tmp_path, user_env(), {})
        [block] = blocks_named("test", "tracing")
        await shell.run_console(block)
        [job_id] = shell.ids.values()
        async with aiohttp.ClientSession() as session:
            done = await wait_for_state(session, url, job_id, {"completed"})
        assert collector.exports == []
        daemon.signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(daemon.wait) == 0, daemon.output()
    finally:
        daemon.kill()
    assert set(collector.content_types) == {"application/x-protobuf"}
    received = {span.name: (resource, span) for resource, span in collector.spans()}
    assert set(received) == {"taskd.submit echo", "taskd.job echo"}
    (resource, submission), (_, attempt) = received["taskd.submit echo"], received["taskd.job echo"]
    assert resource["service.name"] == "from-the-environment"
    assert submission.kind == OtlpSpan.SPAN_KIND_PRODUCER
    assert attempt.kind == OtlpSpan.SPAN_KIND_CONSUMER
    assert submission.trace_id.hex() == attempt.trace_id.hex() == CLIENT_TRACE
    assert submission.parent_span_id.hex() == CLIENT_SPAN
    assert attempt.parent_span_id == submission.span_id
    attributes = _attributes(attempt.attributes)
    assert attributes.pop("taskd.daemon") == done["daemon"]
    assert attributes.pop("taskd.job.wait_ms") >= 0
    assert attributes == {
        "messaging.system": "taskd",
        "messaging.operation.type": "process",
        "messaging.destination.name": "default",
        "messaging.message.id": job_id,
        "taskd.job.id": job_id,
        "taskd.job.type": "echo",
        "taskd.job.attempt": 1,
        "taskd.job.outcome": "completed",
    }
