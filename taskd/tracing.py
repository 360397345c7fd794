"""Tracing with OpenTelemetry: the spans of submissions and attempts, and the trace context
passed on to handlers and callbacks.

A job starts in some service's request and ends in a handler; the trace ties the two:
  taskd.submit TYPE      PRODUCER, one per job submitted over HTTP: a child of the
                         request's traceparent (or the batch job's `trace`), if valid;
  taskd.schedule NAME    PRODUCER, one per tick a schedule fires: a trace of its own;
  taskd.job TYPE         CONSUMER, one per attempt: a child of the job's producer span,
                         whose context is stored with the job (Job.trace), so retries and
                         attempts on other daemons join the same trace. It is the current
                         span while the handler runs: a Python handler's own spans nest
                         under it, and exec and http handlers are handed its context;
  taskd.callback TYPE    CLIENT, one per callback request, a child of the producer span.

This module imports the OpenTelemetry SDK, the optional otel extra: only the daemon does,
and only with tracing on (daemon.open_tracing). The rest of taskd holds a `Tracing | None`
(None: off), and a None check is all that tracing costs it then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import Token
from dataclasses import replace
from types import TracebackType
from typing import Any

import anyio
from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from taskd import __version__
from taskd.config import TracingConfig
from taskd.jobs import Job
from taskd.store import Attempt

logger = logging.getLogger(__name__)

# Longest the daemon waits for its last spans to go out when it stops, and for the SDK to
# shut down: the SDK's own flush has no deadline (each export may take its timeout, 10 s by
# default, with retries), and a collector that does not answer must not hold the exit.
FLUSH_TIMEOUT = 5.0
# Most characters of an error text kept as a span's status description.
STATUS_TEXT = 1024
# Outcomes of an attempt that are errors: it failed, or it ended without an outcome.
_FAILED = frozenset({"retry", "failed", "lost", "crashed"})
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """Makes taskd's spans with `provider`'s tracer; see the module's docstring."""

    def __init__(self, *, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("taskd", __version__)
        self._stuck = False  # a flush gave up: the collector does not answer

    @classmethod
    def start(cls, config: TracingConfig) -> Tracing:
        """Tracing as configured: spans batched and sent over OTLP/HTTP to the collector.

        Its provider becomes OpenTelemetry's global one, so that the spans a Python
        handler makes with `trace.get_tracer(...)` go out with taskd's, under its attempt.
        """
        assert config.traces_url is not None
        resource = Resource.create(
            {"service.name": config.service_name, "service.version": __version__}
        )
        provider = TracerProvider(
            resource=resource, sampler=sampler(config), shutdown_on_exit=False
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(config.traces_url)))
        trace.set_tracer_provider(provider)
        return cls(provider=provider)

    async def flush(self) -> None:
        """Send the spans ended so far, waiting FLUSH_TIMEOUT at most."""
        done = await _within(FLUSH_TIMEOUT, self._provider.force_flush, "flushing spans")
        self._stuck = not done

    async def close(self) -> None:
        """Shut the SDK down (flushing first), waiting FLUSH_TIMEOUT at most; not at all
        once a flush gave up, which the collector would only make wait again."""
        seconds = 0.0 if self._stuck else FLUSH_TIMEOUT
        await _within(seconds, self._provider.shutdown, "shutting tracing down")

    @contextmanager
    def submissions(self, jobs: Sequence[Job]) -> Iterator[list[Job]]:
        """A submission span for each job (a child of the context its `trace` holds, the
        submitter's), open while the jobs are stored: the jobs, each with its span's
        context as its `trace`."""
        with self._producing(jobs, "taskd.submit", [job.type for job in jobs]) as traced:
            yield traced

    @contextmanager
    def tick(self, job: Job, schedule: str) -> Iterator[Job]:
        """A schedule's tick firing `job` (whose `trace` is None: a trace of its own), as
        submissions() does for one job."""
        with self._producing([job], "taskd.schedule", [schedule]) as [traced]:
            yield traced

    def attempt(self, job: Job) -> AttemptSpan:
        """Start the span of the job's attempt, the current span from now on in this task
        (an asyncio task's context is its own): end it with AttemptSpan.end in the same
        task."""
        attributes = _job_attributes(job, "process")
        attributes["taskd.job.attempt"] = job.attempts
        attributes["taskd.job.wait_ms"] = job.waited_ms
        if job.daemon is not None:
            attributes["taskd.daemon"] = job.daemon
        span = self._tracer.start_span(
            f"taskd.job {job.type}",
            context=_parent(job.trace),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        return AttemptSpan(span, context.attach(trace.set_span_in_context(span)))

    def carrier(self) -> dict[str, str]:
        """The current span's context as W3C headers (traceparent, tracestate if any): in
        a handler, its attempt's."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier

    def callback(self, job: Job, host: str) -> Outbound:
        """The span of one callback request for `job` to `host`, a child of the job's
        producer span: use it as a context manager, send its headers."""
        attributes = {**_job_attributes(job, "send"), "http.request.method": "POST"}
        attributes["server.address"] = host
        span = self._tracer.start_span(
            f"taskd.callback {job.type}",
            context=_parent(job.trace),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers, trace.set_span_in_context(span))
        return Outbound(span, headers)

    @contextmanager
    def _producing(
        self, jobs: Sequence[Job], kind: str, names: Sequence[str]
    ) -> Iterator[list[Job]]:
        spans = [
            self._tracer.start_span(
                f"{kind} {name}",
                context=_parent(job.trace),
                kind=SpanKind.PRODUCER,
                attributes=_job_attributes(job, "send"),
            )
            for job, name in zip(jobs, names, strict=True)
        ]
        try:
            yield [replace(job, trace=_stored(span)) for job, span in zip(jobs, spans, strict=True)]
        except BaseException as exc:
            for span in spans:
                _set_error(span, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            ended = time.time_ns()
            for span in spans:
                span.end(ended)


class AttemptSpan:
    """An attempt's span, current in the job's task until end()."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span, token: Token[context.Context]) -> None:
        self._span = span
        self._token = token

    def end(self, attempt: Attempt | None, reason: str) -> None:
        """End it with the attempt's outcome, or, without one, why it had none (`reason`:
        lost or stopped, else it crashed)."""
        outcome = attempt.outcome if attempt is not None else reason or "crashed"
        self._span.set_attribute("taskd.job.outcome", outcome)
        if outcome in _FAILED:
            error = attempt.value if attempt is not None else outcome
            _set_error(self._span, error if isinstance(error, str) else error.decode())
        context.detach(self._token)
        self._span.end()


class Outbound:
    """A request's span, ended when its `with` block is left: with `error` set, or an
    exception leaving it, as a failure."""

    __slots__ = ("_span", "error", "headers")

    def __init__(self, span: trace.Span, headers: dict[str, str]) -> None:
        self._span = span
        self.headers = headers  # the W3C headers to send, naming this span
        self.error: str | None = None

    def __enter__(self) -> Outbound:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.error = f"{type(exc).__name__}: {exc}"
        if self.error is not None:
            _set_error(self._span, self.error)
        self._span.end()


def sampler(config: TracingConfig) -> Sampler:
    """The sampler config.sampler names (OTEL_TRACES_SAMPLER's names), with its ratio."""
    ratio = TraceIdRatioBased(config.sample_ratio)
    return {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": ratio,
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(ratio),
    }[config.sampler]


def _parent(stored: str | None) -> context.Context:
    """The context a job's `trace` holds (traceparent, a space, tracestate), checked by W3C
    Trace Context's rules; an empty one (a new trace) for none, or one that breaks them."""
    if stored is None:
        return context.Context()
    traceparent, _, tracestate = stored.partition(" ")
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier, context.Context())


def _stored(span: trace.Span) -> str:
    """The span's context as a job's `trace` holds it."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    state = carrier.get("tracestate")
    return f"{carrier['traceparent']} {state}" if state else carrier["traceparent"]


def _job_attributes(job: Job, operation: str) -> dict[str, Any]:
    """What a span says of its job, in OpenTelemetry's messaging conventions and taskd's."""
    return {
        "messaging.system": "taskd",
        "messaging.operation.type": operation,
        "messaging.destination.name": job.queue,
        "messaging.message.id": job.id,
        "taskd.job.id": job.id,
        "taskd.job.type": job.type,
    }


def _set_error(span: trace.Span, text: str) -> None:
    span.set_status(Status(StatusCode.ERROR, text[:STATUS_TEXT]))


async def _within(seconds: float, call: Callable[[], object], what: str) -> bool:
    """Run the blocking `call` in a thread, waiting `seconds` at most: whether it ended.

    A daemon thread of its own, not one of anyio's workers: if the collector does not
    answer, the thread is left to its export, and must not keep the process alive.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            call()
        except Exception:
            logger.warning("%s failed", what, exc_info=True)
        finally:
            # The loop may be closed by now: then nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, done)

    threading.Thread(target=run, name=f"taskd {what}", daemon=True).start()
    if seconds <= 0:
        return False
    with anyio.move_on_after(seconds) as scope:
        await asyncio.shield(done)
    if scope.cancelled_caught:
        logger.warning("%s: gave up after %g s (the OTLP collector does not answer)", what, seconds)
    return not scope.cancelled_caught


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
