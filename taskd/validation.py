"""Validation of what clients send: job submissions and listing parameters."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

import orjson

from taskd.config import MAX_ATTEMPTS, QUEUE_NAME, HandlerConfig
from taskd.config.handlers import valid_handler_name
from taskd.egress import DEFAULT_POLICY, Policy, Refused
from taskd.jobs import (
    DEFAULT_PRIORITY,
    FINAL_STATES,
    PRIORITIES,
    PURGEABLE,
    QUEUED,
    SCHEDULED,
    STATES,
    Job,
    new_id,
)

# The furthest ahead a job may be scheduled: a year and a day. Further is far more
# likely a unit mistake (milliseconds for seconds) than a plan.
MAX_DELAY = 366 * 24 * 3600
SUBMIT_FIELDS = (
    "type", "payload", "delay", "run_at", "max_attempts", "idempotency_key", "callback_url",
    "priority", "trace",
)  # fmt: skip
# A submission's `trace`: W3C Trace Context, as its headers of these names would carry it.
TRACE_FIELDS = ("traceparent", "tracestate")
MAX_URL = 2048
MAX_IDEMPOTENCY_KEY = 255
# How deep a payload may nest (objects and arrays): far beyond real data, and well inside
# what orjson encodes (254 levels, the job record around the payload included).
MAX_DEPTH = 64
# Integers JSON parsers keep exactly here: orjson's range. Beyond it orjson silently
# makes a float of them, changing the payload, so they are refused.
INT_RANGE = (-(2**63), 2**64 - 1)
# A run of digits long enough to be such an integer (or part of a string, or a fraction).
_LONG_DIGITS = re.compile(rb"[0-9]{19,}")
# RFC 3339 date-time with its offset; Python's fromisoformat takes more forms than that.
RFC3339_PATTERN = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_RFC3339 = re.compile(RFC3339_PATTERN)
# Epoch seconds a run_at may give at most: later is a unit mistake (milliseconds).
MAX_RUN_AT_EPOCH = 1e11
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 1000
# A listing's cursor is the last job id it gave, or for final states "finish-ms-id".
ID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
CURSOR_PATTERNS = (ID_PATTERN, r"[0-9]{1,15}-" + ID_PATTERN)  # by creation; by finish
_CURSOR = {False: re.compile(CURSOR_PATTERNS[0]), True: re.compile(CURSOR_PATTERNS[1])}
_JOB_ID = re.compile(ID_PATTERN)
# GET /archive's cursor: "finish-ms:id" in unpadded base64url (taskd.archive.db.encode_cursor).
ARCHIVE_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,100}")
_ARCHIVE_POSITION = re.compile(r"[0-9]{1,14}:" + ID_PATTERN)
ARCHIVE_PARAMS = ("type", "queue", "state", "since", "until", "q", "limit", "cursor")
# Epoch seconds in a query string: digits, maybe a fraction.
SECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
# A time's "+hh:mm" offset written unencoded in a URL's query arrives with a space for the "+".
_SPACED_OFFSET = re.compile(r" (?=[0-9]{2}:[0-9]{2}$)")
# What a traceparent or tracestate may hold at all (W3C: printable ASCII, no space in a
# traceparent), and how long: the rest of their rules taskd.tracing checks.
_TRACEPARENT = re.compile(r"[\x21-\x7e]{1,512}")
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,8192}")


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_job", message)


def parse_submission(
    body: bytes,
    handlers: Mapping[str, HandlerConfig],
    now: int,
    header_key: str | None = None,
    *,
    egress: Policy = DEFAULT_POLICY,
    traced: bool = False,
    trace: str | None = None,
) -> Job:
    """The new job a request body asks for, or an ApiError saying what is wrong with it.

    `header_key` is the request's Idempotency-Key header, the same as the body's
    `idempotency_key` field (giving both, they must agree). `egress` refuses callback
    URLs it can judge without DNS. With `traced` (tracing on), the job's `trace` is the
    body's `trace` field, else `trace`, the request's own (its W3C headers, as
    trace_context makes it); without, it is None.
    """
    data = _json_body(body)
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    if header_key is not None:
        # A null field is as good as an absent one.
        if data.get("idempotency_key") is None:
            data["idempotency_key"] = header_key
        if data["idempotency_key"] != header_key:
            raise invalid("the Idempotency-Key header and 'idempotency_key' differ")
    return _new_job(data, handlers, now, egress, trace, traced=traced)


def parse_batch(
    body: bytes,
    handlers: Mapping[str, HandlerConfig],
    now: int,
    most: int,
    *,
    egress: Policy = DEFAULT_POLICY,
    traced: bool = False,
    trace: str | None = None,
) -> list[Job]:
    """The jobs of a batch, all valid, or an ApiError naming the first bad one's index.
    `traced` and `trace` as for parse_submission: `trace` is each job's without a field."""
    data = _json_body(body)
    if not isinstance(data, dict) or set(data) != {"jobs"} or not isinstance(data["jobs"], list):
        raise invalid('the request body must be {"jobs": [job, ...]}')
    if not 1 <= len(data["jobs"]) <= most:
        raise invalid(
            f"a batch holds 1 to {most} jobs ([server] max_batch), got {len(data['jobs'])}"
        )
    jobs = []
    for index, item in enumerate(data["jobs"]):
        try:
            if not isinstance(item, dict):
                raise invalid(f"must be a JSON object, got {json_kind(item)}")
            jobs.append(_new_job(item, handlers, now, egress, trace, traced=traced))
        except ApiError as exc:
            raise ApiError(exc.status, exc.code, f"jobs[{index}]: {exc.message}") from None
    return jobs


def _json_body(body: bytes) -> Any:
    """The parsed body. A key given twice in one object keeps its last value."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    if _LONG_DIGITS.search(body):
        _check_integers(body)
    return data


def _check_integers(body: bytes) -> None:
    """Refuse integers outside INT_RANGE, which orjson would have made floats of.

    Only bodies with a long run of digits get here, so the slower stdlib parser, which
    hands over every integer's text, costs nothing on the usual path.
    """

    def exact(text: str) -> int:
        value = int(text)
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise invalid(
                f"the integer {text[:40]} is outside the 64-bit range taskd keeps exactly"
                f" ({INT_RANGE[0]} to {INT_RANGE[1]}); send it as a string"
            )
        return value

    # As deep as recursion fails, the payload's depth is refused, naming its job's index.
    with contextlib.suppress(RecursionError):
        json.loads(body, parse_int=exact)


def _new_job(
    data: dict[str, Any],
    handlers: Mapping[str, HandlerConfig],
    now: int,
    egress: Policy,
    trace: str | None = None,
    *,
    traced: bool = False,
) -> Job:
    """The job `data` asks for; `trace` and `traced` as for parse_submission."""
    unknown = sorted(set(data) - set(SUBMIT_FIELDS))
    if unknown:
        raise invalid(
            f"unknown field(s) {', '.join(unknown)}; a job takes {', '.join(SUBMIT_FIELDS)}"
        )
    handler = handlers[_job_type(data, handlers)]
    _check_depth(data.get("payload"))
    run_at = _run_at(data, now)
    own = data.get("trace")
    if own is not None:
        # Checked with tracing off too: whether a body is valid does not depend on config.
        trace = _trace(own)
    return Job(
        id=new_id(),
        type=handler.name,
        queue=handler.queue,
        payload=data.get("payload"),
        state=SCHEDULED if run_at else QUEUED,
        attempts=0,
        created_at=now,
        max_attempts=_max_attempts(data, handler),
        run_at=run_at,
        idempotency_key=_idempotency_key(data),
        callback_url=_callback_url(data, egress),
        priority=_priority(data),
        trace=trace if traced else None,
    )


def trace_context(traceparent: str | None, tracestate: str | None) -> str | None:
    """A W3C trace context as Job.trace holds it: the traceparent, then a space and the
    tracestate if any. None without a traceparent that could be one: W3C Trace Context
    asks receivers to ignore an invalid one (and then its tracestate), never to refuse
    the request. The rest of its rules are checked where it is used (taskd.tracing)."""
    if traceparent is None or not _TRACEPARENT.fullmatch(traceparent := traceparent.strip()):
        return None
    if tracestate is None or not _TRACESTATE.fullmatch(tracestate := tracestate.strip()):
        return traceparent
    return f"{traceparent} {tracestate}"


def _trace(value: Any) -> str | None:
    """A submission's `trace` field: its shape is ours to check, its values W3C's."""
    rule = f"an object of the W3C strings {' and '.join(TRACE_FIELDS)}"
    if not isinstance(value, dict):
        raise invalid(f"'trace' must be {rule}, got {json_kind(value)}")
    unknown = sorted(set(value) - set(TRACE_FIELDS))
    if unknown:
        raise invalid(f"unknown field(s) in 'trace': {', '.join(unknown)}; it takes {rule}")
    for name, given in value.items():
        if given is not None and not isinstance(given, str):
            raise invalid(f"'trace.{name}' must be a string, got {json_kind(given)}")
    return trace_context(value.get("traceparent"), value.get("tracestate"))


def _check_depth(
    payload: Any, name: str = "payload", fail: Callable[[str], ApiError] = invalid
) -> None:
    """Refuse a payload nested deeper than MAX_DEPTH, before anything is written: deeper
    ones would fail to encode halfway through a batch."""
    pending = [(payload, 1)] if isinstance(payload, dict | list) else []
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > MAX_DEPTH:
            raise fail(f"'{name}' nests deeper than {MAX_DEPTH} levels of objects and arrays")
        pending += [(child, depth + 1) for child in children if isinstance(child, dict | list)]


def _job_type(data: dict[str, Any], handlers: Mapping[str, HandlerConfig]) -> str:
    job_type = data.get("type")
    if job_type is None:
        raise invalid("missing field 'type': the name of a configured handler")
    if not isinstance(job_type, str):
        raise invalid(f"field 'type' must be a string, got {json_kind(job_type)}")
    if job_type not in handlers:
        known = ", ".join(sorted(handlers))
        raise ApiError(
            422, "unknown_type", f"unknown job type '{job_type}'; configured types: {known}"
        )
    return job_type


def _run_at(data: dict[str, Any], now: int) -> int | None:
    """When the job may run, in epoch ms; None for now (a time in the past also means now)."""
    delay, run_at = data.get("delay"), data.get("run_at")
    if delay is not None and run_at is not None:
        raise invalid("give either 'delay' or 'run_at', not both")
    if delay is not None:
        if not _is_number(delay) or not 0 <= delay <= MAX_DELAY:
            raise invalid(
                f"'delay' must be a number of seconds from 0 to {MAX_DELAY}, got {delay!r}"
            )
        due = now + math.ceil(delay * 1000)
    elif run_at is not None:
        due = _parse_time(run_at)
        if due > now + MAX_DELAY * 1000:
            raise invalid(f"'run_at' is more than {MAX_DELAY} seconds ahead: {run_at!r}")
    else:
        return None
    return due if due > now else None


def _parse_time(value: Any, name: str = "run_at", fail: Callable[[str], ApiError] = invalid) -> int:
    """An RFC 3339 time with its offset, or epoch seconds, as epoch ms; `fail` makes the
    error naming `name` when it is neither."""
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        if not _RFC3339.fullmatch(value):
            raise fail(
                f"'{name}' is not an RFC 3339 time with a UTC offset"
                f" (e.g. '2026-12-04T10:00:00Z' or '...+02:00'): {value!r}"
            )
        try:
            seconds = datetime.fromisoformat(value.upper()).timestamp()
        except ValueError:
            raise fail(f"'{name}' is not a valid time: {value!r}") from None
    else:
        raise fail(f"'{name}' must be an RFC 3339 time or epoch seconds, got {json_kind(value)}")
    if not 0 <= seconds < MAX_RUN_AT_EPOCH:
        raise fail(f"'{name}' is out of range: {value!r}")
    return math.ceil(seconds * 1000)


def _callback_url(data: dict[str, Any], egress: Policy) -> str | None:
    url = data.get("callback_url")
    if url is None:
        return None
    parts = _split(url) if isinstance(url, str) and len(url) <= MAX_URL else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or _BAD_HOST.search(parts.hostname)
        or _CONTROL.search(url)
    ):
        raise invalid(f"'callback_url' must be an http:// or https:// URL, got {url!r}")
    # Names are checked when the callback is sent: DNS here would slow every submission,
    # and what a name resolves to may change before then.
    try:
        egress.check_url(url)
    except Refused as exc:
        raise invalid(f"'callback_url' refused: {exc}") from None
    return str(url)


# What no host name or address holds (urlsplit lets them through): spaces and control
# characters, and those RFC 3986 leaves out of a host. Such a URL could never be sent.
_BAD_HOST = re.compile(r'[\x00-\x20\x7f"<>\\^`{|}%]')
# Nor does a URL anywhere: urlsplit drops tabs and line breaks silently, so the URL it
# checked would not be the one stored.
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def _split(url: str) -> SplitResult | None:
    """The URL's parts, or None where urlsplit refuses it (an unclosed IPv6 bracket)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _idempotency_key(data: dict[str, Any]) -> str | None:
    key = data.get("idempotency_key")
    if key is None:
        return None
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY
        or not key.isprintable()
    ):
        rule = f"1 to {MAX_IDEMPOTENCY_KEY} printable characters"
        raise invalid(f"'idempotency_key' must be {rule}, got {key!r}")
    return key


def _max_attempts(data: dict[str, Any], handler: HandlerConfig) -> int:
    value = data.get("max_attempts", handler.max_attempts)
    if not _is_int(value) or not 1 <= value <= MAX_ATTEMPTS:
        raise invalid(f"'max_attempts' must be an integer from 1 to {MAX_ATTEMPTS}, got {value!r}")
    return int(value)


def _priority(data: dict[str, Any]) -> int:
    value = data.get("priority")
    if value is None:
        return DEFAULT_PRIORITY
    if not _is_int(value) or value not in PRIORITIES:
        low, high = PRIORITIES[0], PRIORITIES[-1]
        raise invalid(
            f"'priority' must be an integer from {low} (lowest) to {high} (highest), got {value!r}"
        )
    return int(value)


@dataclass(frozen=True, slots=True)
class ListQuery:
    """What GET /jobs asks for."""

    queue: str | None
    state: str | None
    job_type: str | None
    limit: int
    cursor: str | None


def bad_query(message: str) -> ApiError:
    return ApiError(400, "invalid_query", message)


def parse_list_query(params: Mapping[str, str]) -> ListQuery:
    """The parameters of a listing, or an ApiError (400) saying which one is wrong."""
    _refuse_unknown(params, ("queue", "state", "type", "limit", "cursor"))
    state = params.get("state") or None
    if state is not None and state not in STATES:
        raise bad_query(f"'state' must be one of {', '.join(STATES)}")
    cursor = params.get("cursor") or None
    if cursor is not None and not _CURSOR[state in FINAL_STATES].fullmatch(cursor):
        raise bad_query("'cursor' is not one this API gave out")
    return ListQuery(
        queue=params.get("queue") or None,
        state=state,
        job_type=params.get("type") or None,
        limit=_limit(params),
        cursor=cursor,
    )


def parse_purge_query(params: Mapping[str, str]) -> str:
    """The state a purge deletes (DELETE /queues/NAME/jobs?state=), or an ApiError (400)."""
    _refuse_unknown(params, ("state",))
    state = params.get("state") or None
    if state is None or state not in PURGEABLE:
        given = "give 'state':" if state is None else "'state' must be"
        raise bad_query(
            f"{given} one of {', '.join(PURGEABLE)} (a purge deletes waiting jobs or dead"
            " letters, never running ones)"
        )
    return state


@dataclass(frozen=True, slots=True)
class DeadRetry:
    """Which dead letters POST /dead/retry puts back: of a queue and a type, or any."""

    queue: str | None
    job_type: str | None


DEAD_RETRY_PARAMS = ("type", "queue")


def parse_dead_retry(params: Mapping[str, str], body: bytes) -> DeadRetry:
    """The filters of POST /dead/retry, as query parameters or a JSON object body (or
    both, if they agree), or an ApiError (400) saying which one is wrong."""
    _refuse_unknown(params, DEAD_RETRY_PARAMS)
    given = {name: params.get(name) or None for name in DEAD_RETRY_PARAMS}
    for name, value in _body_filters(body).items():
        if given[name] not in (None, value):
            raise bad_query(f"'{name}' is {given[name]!r} in the query but {value!r} in the body")
        given[name] = value
    job_type, queue = given["type"], given["queue"]
    if job_type is not None and not valid_handler_name(job_type):
        raise bad_query(f"'type' is not a job type's name: {job_type!r}")
    if queue is not None and not valid_queue(queue):
        raise bad_query(f"'queue' is not a queue's name: {queue!r}")
    return DeadRetry(queue=queue, job_type=job_type)


def _body_filters(body: bytes) -> dict[str, str]:
    """The filters a JSON object body gives, those not null or empty (no body: none)."""
    if not body.strip():
        return {}
    data = _json_body(body)
    if not isinstance(data, dict):
        raise bad_query(f"the body must be a JSON object or empty, got {json_kind(data)}")
    _refuse_unknown(data, DEAD_RETRY_PARAMS)
    for name, value in data.items():
        if value is not None and not isinstance(value, str):
            raise bad_query(f"'{name}' must be a string, got {json_kind(value)}")
    return {name: value for name, value in data.items() if value}


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiveQuery:
    """What GET /archive asks for; None: any. Times are epoch ms, finished at or after
    `since` and before `until`; `contains` is the JSON text of `q`."""

    job_type: str | None
    queue: str | None
    state: str | None
    since: int | None
    until: int | None
    contains: str | None
    limit: int
    cursor: str | None


def parse_archive_query(params: Mapping[str, str]) -> ArchiveQuery:
    """The parameters of GET /archive, or an ApiError (400) saying which one is wrong.

    Everything the database would refuse is refused here (a NUL in a name, a cursor that
    is not ours), so that a bad query is a 400, never a database error.
    """
    _refuse_unknown(params, ARCHIVE_PARAMS)
    state = params.get("state") or None
    if state is not None and state not in FINAL_STATES:
        raise bad_query(
            f"'state' must be one of {', '.join(FINAL_STATES)}: the archive holds finished jobs"
        )
    job_type = params.get("type") or None
    if job_type is not None and not valid_handler_name(job_type):
        raise bad_query(f"'type' is not a job type's name: {job_type!r}")
    queue = params.get("queue") or None
    if queue is not None and not valid_queue(queue):
        raise bad_query(f"'queue' is not a queue's name: {queue!r}")
    since, until = _query_time(params, "since"), _query_time(params, "until")
    if since is not None and until is not None and until <= since:
        raise bad_query("'until' must be later than 'since'")
    cursor = params.get("cursor") or None
    if cursor is not None and not _is_archive_cursor(cursor):
        raise bad_query("'cursor' is not one GET /archive gave out")
    return ArchiveQuery(
        job_type=job_type,
        queue=queue,
        state=state,
        since=since,
        until=until,
        contains=_contains(params.get("q") or None),
        limit=_limit(params),
        cursor=cursor,
    )


def _refuse_unknown(params: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise bad_query(f"unknown parameter(s) {', '.join(unknown)}")


def _limit(params: Mapping[str, str]) -> int:
    raw_limit = params.get("limit", str(LIST_LIMIT_DEFAULT))
    # ASCII digits only: str.isdigit() also takes digits int() refuses, such as "²".
    if (
        not (raw_limit.isascii() and raw_limit.isdigit())
        or not 1 <= int(raw_limit) <= LIST_LIMIT_MAX
    ):
        raise bad_query(f"'limit' must be from 1 to {LIST_LIMIT_MAX}")
    return int(raw_limit)


def _query_time(params: Mapping[str, str], name: str) -> int | None:
    """A time parameter as _parse_time takes them (RFC 3339, or epoch seconds), epoch ms."""
    value = params.get(name) or None
    if value is None:
        return None
    if SECONDS.fullmatch(value):
        return _parse_time(float(value), name, bad_query)
    return _parse_time(_SPACED_OFFSET.sub("+", value), name, bad_query)


def _contains(text: str | None) -> str | None:
    """`q`, a JSON value, as the JSON text the archive looks for in payloads."""
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise bad_query(f"'q' is not valid JSON: {exc}") from None
    _check_depth(value, "q", bad_query)
    return orjson.dumps(value).decode()


def _is_archive_cursor(cursor: str) -> bool:
    if not ARCHIVE_CURSOR.fullmatch(cursor):
        return False
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    return _ARCHIVE_POSITION.fullmatch(text) is not None


def valid_job_id(text: str) -> bool:
    """Whether `text` has the shape of a job id (a UUIDv7, as new_id makes them)."""
    return _JOB_ID.fullmatch(text) is not None


def valid_queue(name: str) -> bool:
    return QUEUE_NAME.fullmatch(name) is not None


def json_kind(value: Any) -> str:
    kinds = {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
