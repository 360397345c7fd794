"""The client's sans-IO core: each call as a request, its answer as a value or an exception,
and when to send again. `Client` and `AsyncClient` only move the bytes."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar, cast
from urllib.parse import quote, urlencode

import orjson

from taskd import __version__
from taskd.client.address import Endpoint, endpoint, locate
from taskd.client.documents import (
    Job,
    NewJob,
    Page,
    Purged,
    QueueState,
    Retried,
    TraceContext,
)
from taskd.client.errors import (
    RequestTimeout,
    TaskdError,
    TransportError,
    Unavailable,
    WaitTimeout,
    error_of,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# taskd.jobs.FINAL_STATES, which would import the daemon's job model with it.
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
# Resends after a failed connection, and the wait before the first (doubling after):
# enough to ride out a daemon's restart without hiding one that is gone for good.
RETRIES = 3
BACKOFF = 0.25
# A 503's Retry-After is waited for, when the request may be resent, up to this long.
MOST_RETRY_AFTER = 10.0
# Long enough for a daemon whose Redis is slow, short enough that a hung one is noticed.
TIMEOUT = 30.0
# wait() polls GET /jobs/ID: soon at first (most jobs are quick), then less often.
POLL_FIRST, POLL_GROWTH, POLL_MOST = 0.02, 1.5, 1.0
USER_AGENT = f"taskd-client/{__version__}"


@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One API call: what to send, whether it may be sent again, and how to read the answer."""

    method: str
    path: str  # with its query string, under the URL's prefix
    read: Callable[[Any], T]  # the JSON of a 2xx answer to the call's value
    body: bytes | None = None
    # Sent again after the connection dropped with the request written: only when doing it
    # twice does no more than doing it once.
    resend: bool = True

    def headers(self, token: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers


@dataclass(frozen=True, slots=True)
class Options:
    """What both clients are built from: where the daemon is, its token, how long to wait for
    an answer, and how many times a request is sent again."""

    endpoint: Endpoint
    token: str | None
    timeout: float | None
    retries: int

    @classmethod
    def of(
        cls,
        url: str | None,
        *,
        token: str | None,
        config: str | None,
        timeout: float | None,
        retries: int,
    ) -> Options:
        """`url`, else $TASKD_URL, else the `server.listen` of the `config` file, else
        http://127.0.0.1:7700; `token`, else $TASKD_TOKEN, else that config's."""
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None: {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number from 0: {retries!r}")
        target = locate(url, token, config, os.environ)
        return cls(endpoint(target.url), target.token, timeout, retries)

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def makes_keys(self) -> bool:
        """Whether a submission without an idempotency key gets one: when it may be resent."""
        return self.retries > 0


def answer(
    request: Request[T], status: int, reason: str, body: bytes, retry_after: str | None
) -> T:
    """The call's value from a 2xx answer; the DaemonError of any other."""
    if not 200 <= status < 300:
        raise error_of(status, reason, body, retry_after)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TaskdError(f"the daemon's answer is not JSON: {body[:200]!r}") from None
    return request.read(data)


def resend_after(request: Request[Any], error: TaskdError, resends: int, most: int) -> float | None:
    """Seconds to wait before sending `request` again after `error`, or None to raise it.

    Connection failures are tried again while the request cannot have reached the daemon, or
    may be repeated; an error answer only when it is a 503 with a short Retry-After (Redis
    was slow or full, and nothing says the next try fails too).
    """
    wait = _wait(request, error, resends) if resends < most else None
    if wait is not None:
        what = f"{request.method} {request.path}"
        logger.info("%s: %s; sending it again in %g s", what, error, wait)
    return wait


def _wait(request: Request[Any], error: TaskdError, resends: int) -> float | None:
    if isinstance(error, TransportError) and error.transient:
        return BACKOFF * 2**resends if request.resend or not error.sent else None
    if isinstance(error, Unavailable) and request.resend and error.retry_after is not None:
        return error.retry_after if error.retry_after <= MOST_RETRY_AFTER else None
    return None


def no_answer(url: str, reason: str, *, sent: bool, transient: bool = True) -> TransportError:
    """The error for a connection that failed: before the request was written, or after."""
    if sent:
        message = f"the connection to the daemon at {url} dropped before it answered: {reason}"
    else:
        message = f"cannot reach the daemon at {url}: {reason}"
    return TransportError(message, sent=sent, transient=transient)


def timed_out(url: str, timeout: float | None, *, sent: bool) -> RequestTimeout:
    within = f"within {timeout:g} s" if timeout is not None else "in time"
    return RequestTimeout(f"the daemon at {url} did not answer {within}", sent=sent)


class Poll:
    """wait()'s schedule: after each look at the job, how long to sleep before the next."""

    def __init__(
        self, job_id: str, timeout: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._job_id = job_id
        self._timeout = timeout
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._interval = POLL_FIRST

    def after(self, job: Job) -> float | None:
        """None once the job is final; else the sleep, or WaitTimeout past the deadline."""
        if job["state"] in FINAL_STATES:
            return None
        pause, self._interval = self._interval, min(self._interval * POLL_GROWTH, POLL_MOST)
        if self._deadline is None:
            return pause
        left = self._deadline - self._clock()
        if left <= 0:
            message = f"job {self._job_id} is still {job['state']} after {self._timeout:g} s"
            raise WaitTimeout(message, job)
        return min(pause, left)


# The requests, one per API call.


def submit(job: NewJob, *, key_if_none: bool) -> Request[Job]:
    """POST /jobs. With `key_if_none`, a job without an idempotency key gets a new one, so
    that the submission can be sent again after a dropped connection without a second job."""
    return Request("POST", "/jobs", _job, _dumps(_submission(job, key_if_none)))


def submit_many(jobs: Iterable[NewJob], *, key_if_none: bool) -> Request[list[str]]:
    """POST /jobs/batch: the ids, in the order sent (a repeated key gives the first job's)."""
    body = {"jobs": [_submission(job, key_if_none) for job in jobs]}
    return Request("POST", "/jobs/batch", _ids, _dumps(body))


def get(job_id: str) -> Request[Job]:
    return Request("GET", _job_path(job_id), _job)


def cancel(job_id: str) -> Request[Job]:
    # Not resent: had the first cancelled the job, a second would answer 409 as if it had
    # been too late.
    return Request("POST", _job_path(job_id) + "/cancel", _job, resend=False)


def retry(job_id: str) -> Request[Job]:
    # Not resent: had the job failed again since the first, a second would run it again.
    return Request("POST", _job_path(job_id) + "/retry", _job, resend=False)


def delete(job_id: str) -> Request[None]:
    # Resent: HTTP's DELETE is idempotent (aiohttp resends it by itself on a reused
    # connection); after a resend, NotFound may mean that the first one deleted it.
    return Request("DELETE", _job_path(job_id), _nothing)


def list_jobs(
    *,
    state: str | None = None,
    queue: str | None = None,
    job_type: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Request[Page]:
    params = {"state": state, "queue": queue, "type": job_type, "limit": limit, "cursor": cursor}
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return Request("GET", f"/jobs?{query}" if query else "/jobs", _page)


def stats() -> Request[dict[str, Any]]:
    return Request("GET", "/stats", _object)


def pause(queue: str) -> Request[QueueState]:
    return Request("POST", f"/queues/{_segment(queue)}/pause", _queue_state)


def resume(queue: str) -> Request[QueueState]:
    return Request("POST", f"/queues/{_segment(queue)}/resume", _queue_state)


def purge(queue: str, state: str) -> Request[Purged]:
    # Resent: a second purge removes what arrived since the first, as a first that took
    # longer might have (a purge leaves open whether it takes the jobs arriving meanwhile).
    query = urlencode({"state": state})
    return Request("DELETE", f"/queues/{_segment(queue)}/jobs?{query}", _purged)


def retry_dead(*, job_type: str | None, queue: str | None) -> Request[Retried]:
    # Not resent: a dead letter the first put back, which failed again since, would be
    # retried once more.
    params = {"type": job_type, "queue": queue}
    query = urlencode({k: v for k, v in params.items() if v is not None})
    path = f"/dead/retry?{query}" if query else "/dead/retry"
    return Request("POST", path, _retried, resend=False)


def new_job(
    job_type: str,
    payload: Any,
    *,
    delay: float | timedelta | None,
    run_at: datetime | str | float | None,
    priority: int | None,
    idempotency_key: str | None,
    callback_url: str | None,
    max_attempts: int | None,
    trace: TraceContext | None = None,
) -> NewJob:
    """submit()'s arguments as one job, leaving out those not given."""
    job = NewJob(type=job_type, payload=payload)
    given: Mapping[str, Any] = {
        "delay": delay,
        "run_at": run_at,
        "priority": priority,
        "idempotency_key": idempotency_key,
        "callback_url": callback_url,
        "max_attempts": max_attempts,
        "trace": trace,
    }
    job.update(cast(NewJob, {k: v for k, v in given.items() if v is not None}))
    return job


def _submission(job: NewJob, key_if_none: bool) -> dict[str, Any]:
    """A job as the API takes it: times as numbers or RFC 3339, and an idempotency key."""
    body: dict[str, Any] = dict(job)
    if isinstance(delay := body.get("delay"), timedelta):
        body["delay"] = delay.total_seconds()
    if isinstance(run_at := body.get("run_at"), datetime):
        body["run_at"] = _rfc3339(run_at)
    if key_if_none and body.get("idempotency_key") is None:
        body["idempotency_key"] = str(uuid.uuid4())
    return body


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        # A naive time could be any zone's; the daemon's clock is not the caller's.
        raise ValueError(f"run_at needs a timezone-aware datetime, got {moment!r}")
    return moment.astimezone(UTC).isoformat()


def _dumps(body: Any) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError as exc:
        raise TypeError(f"the job is not JSON: {exc}") from None


def _job_path(job_id: str) -> str:
    return f"/jobs/{_segment(job_id)}"


def _segment(text: str) -> str:
    """One path segment: a `/` or `?` in an id stays in it, it does not lead elsewhere."""
    return quote(text, safe="")


# Readers of the answers. The daemon's documents are taken as they are: checking every
# field would only break a client older than its daemon.


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TaskdError(f"expected a JSON object from the daemon, got {str(data)[:200]}")
    return data


def _job(data: Any) -> Job:
    job = _object(data)
    if not isinstance(job.get("id"), str) or not isinstance(job.get("state"), str):
        raise TaskdError(f"expected a job from the daemon, got {str(data)[:200]}")
    return cast(Job, job)


def _ids(data: Any) -> list[str]:
    ids = _object(data).get("ids")
    if not isinstance(ids, list):
        raise TaskdError(f"expected the job ids from the daemon, got {str(data)[:200]}")
    return [str(i) for i in ids]


def _page(data: Any) -> Page:
    page = _object(data)
    jobs, cursor = page.get("jobs"), page.get("next_cursor")
    if not isinstance(jobs, list) or not isinstance(cursor, str | None):
        raise TaskdError(f"expected a page of jobs from the daemon, got {str(data)[:200]}")
    return Page([_job(job) for job in jobs], cursor)


def _queue_state(data: Any) -> QueueState:
    return cast(QueueState, _object(data))


def _purged(data: Any) -> Purged:
    return cast(Purged, _object(data))


def _retried(data: Any) -> Retried:
    return cast(Retried, _object(data))


def _nothing(data: Any) -> None:
    return None
