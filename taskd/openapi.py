"""The OpenAPI 3.1 document of the HTTP API, built from the rules and limits the code enforces."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from taskd import __version__
from taskd.config import HANDLER_NAME, MAX_ATTEMPTS, QUEUE_NAME, ServerConfig
from taskd.dashboard import CONTENT_TYPES
from taskd.guards import token_needed
from taskd.jobs import DEFAULT_PRIORITY, FINAL_STATES, PRIORITIES, PURGEABLE, STATES
from taskd.store.record import TOTALS
from taskd.validation import (
    ARCHIVE_CURSOR,
    CURSOR_PATTERNS,
    ID_PATTERN,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_DELAY,
    MAX_DEPTH,
    MAX_IDEMPOTENCY_KEY,
    MAX_RUN_AT_EPOCH,
    MAX_URL,
    RFC3339_PATTERN,
    SECONDS,
    TRACE_FIELDS,
)

JSON = "application/json"
SCHEMAS = "#/components/schemas/"

# Every error code the daemon answers, with its HTTP status and when. The test of this
# module finds every code the code can produce and holds this table to them.
ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "HTTP the daemon cannot parse: a bad request line or header"),
    "invalid_json": (400, "the body is not valid JSON"),
    "invalid_query": (400, "a bad listing parameter, or an unknown one"),
    "connection_closed": (400, "the connection closed while the body was read"),
    "unauthorized": (401, "[server] token is set and the request did not carry it"),
    "forbidden_origin": (403, "a write whose Origin is another site's (programs send none)"),
    "not_found": (404, "no such job, queue, file or endpoint"),
    "archive_not_configured": (404, "GET /archive of a daemon without [archive] url"),
    "method_not_allowed": (405, "the endpoint does not take that method"),
    "conflict": (409, "the job or queue is not in a state that allows it"),
    "body_too_large": (413, "the body is larger than [server] max_body"),
    "unsupported_media_type": (415, "a body without Content-Type: application/json"),
    "misdirected": (421, "the Host is not an IP address, localhost or in [server] allowed_hosts"),
    "invalid_job": (422, "a submission breaks a rule of the job schema (the message says which)"),
    "unknown_type": (422, "`type` names no configured handler"),
    "internal": (500, "a bug of taskd's; the daemon's log has the traceback"),
    "unavailable": (503, "Redis does not answer, or not within [redis] request_timeout"),
    "storage_full": (503, "Redis is full (maxmemory reached): nothing was written"),
    "archive_unavailable": (503, "the archive (PostgreSQL) did not answer in time"),
    "shutting_down": (503, "the daemon is stopping; submit to another one"),
}
# What aiohttp itself raises with another status than those above (none is known to).
FALLBACK_CODE = "http_error"
# Per status: the name of its response in components/responses.
_ERROR_RESPONSES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "ForbiddenOrigin",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "BodyTooLarge",
    415: "UnsupportedMediaType",
    421: "Misdirected",
    422: "InvalidJob",
    500: "Internal",
    503: "Unavailable",
}
# Answered by any operation: a request aiohttp cannot parse, a Host the daemon does not
# answer to, a bug.
_ANY = (400, 421, 500)
# And by every operation that reads or writes Redis.
_REDIS = (*_ANY, 503)
_SUBMIT = (*_REDIS, 403, 413, 415, 422)
_ON_JOB = (*_REDIS, 403, 404, 409)
_INFO = (
    "The HTTP API of one taskd daemon, as configured: the job types it takes, its"
    " `[server] max_batch`, and which endpoints need its `[server] token`. Every error is"
    ' `{"error": {"code", "message"}}`; a path no endpoint serves answers 404 `not_found`,'
    " a method an endpoint does not take 405 `method_not_allowed`. A GET endpoint also"
    " answers HEAD. See docs/api.md for what each field means."
)


def describe(*, server: ServerConfig, job_types: Collection[str]) -> dict[str, Any]:
    """The OpenAPI document of a daemon with this [server] section and these job types:
    which endpoints need its token, its max_batch, the types it takes."""
    needed = token_needed(server) if server.token is not None else None
    paths: dict[str, dict[str, Any]] = {}
    for path, method, operation in _operations(server):
        if needed is not None and needed(method.upper(), path):
            operation["security"] = [{"bearer": []}]
            _add_errors(operation, [401])
        paths.setdefault(path, {})[method] = operation
    components: dict[str, Any] = {
        "schemas": _schemas(server, job_types),
        "responses": _error_responses(),
    }
    if needed is not None:
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "[server] token, as `Authorization: Bearer TOKEN`.",
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskd",
            "version": __version__,
            "description": _INFO,
        },
        "paths": paths,
        "components": components,
    }


def _operations(server: ServerConfig) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) for every endpoint, without security."""
    job_id = _path_param("id", _id(), "the job's id")
    queue = _path_param("queue", _queue_name(), "the queue's name")
    created = _links("$response.body#/id")
    yield _op(
        "post",
        "/jobs",
        "submitJob",
        "jobs",
        "Submit a job",
        parameters=[_idempotency_header(), *_trace_headers()],
        body=_ref("Submission"),
        ok={
            "201": _json("The job, created", _ref("Job"), location=True, links=created),
            "200": _json(
                "The job an earlier submission with the same idempotency key created",
                _ref("Job"),
                location=True,
                links=created,
            ),
        },
        errors=_SUBMIT,
    )
    yield _op(
        "get",
        "/jobs",
        "listJobs",
        "jobs",
        "List jobs, newest first",
        parameters=_listing(with_state=True),
        ok={"200": _json("A page of jobs", _ref("JobPage"))},
        errors=_REDIS,
    )
    yield _op(
        "post",
        "/jobs/batch",
        "submitBatch",
        "jobs",
        f"Submit 1 to {server.max_batch} jobs at once ([server] max_batch)",
        parameters=_trace_headers(),
        body=_ref("Batch"),
        ok={
            "201": _json(
                "Their ids, in the order sent",
                _ref("BatchIds"),
                links=_links("$response.body#/ids/0"),
            )
        },
        errors=_SUBMIT,
    )
    yield _op(
        "get",
        "/jobs/{id}",
        "getJob",
        "jobs",
        "A job: from Redis, else (its retention over, or deleted) from the archive",
        parameters=[job_id],
        ok={
            "200": _json(
                "The job (marked `archived` when the archive answered)",
                {"oneOf": [_ref("Job"), _ref("ArchivedJob")]},
            )
        },
        errors=(*_REDIS, 404),
    )
    yield _op(
        "delete",
        "/jobs/{id}",
        "deleteJob",
        "jobs",
        "Delete a job that is not running",
        parameters=[job_id],
        ok={"200": _json("Deleted", _ref("Deleted"))},
        errors=_ON_JOB,
    )
    yield _op(
        "post",
        "/jobs/{id}/cancel",
        "cancelJob",
        "jobs",
        "Cancel a queued, scheduled or active job",
        parameters=[job_id],
        ok={
            "200": _json("Cancelled: it was waiting", _ref("Job")),
            "202": _json("Cancel requested: the daemon running it cancels it", _ref("Job")),
        },
        errors=_ON_JOB,
    )
    yield _op(
        "post",
        "/jobs/{id}/retry",
        "retryJob",
        "jobs",
        "Put a failed job back on its queue, its attempts reset",
        parameters=[job_id],
        ok={"200": _json("The job, back on its queue", _ref("Job"))},
        errors=_ON_JOB,
    )
    yield _op(
        "get",
        "/dead",
        "listDeadLetters",
        "jobs",
        "List failed jobs (dead letters), as GET /jobs?state=failed",
        parameters=_listing(with_state=False),
        ok={"200": _json("A page of failed jobs", _ref("JobPage"))},
        errors=_REDIS,
    )
    yield _op(
        "get",
        "/archive",
        "listArchive",
        "jobs",
        "List archived jobs ([archive]), newest first by finish time",
        parameters=_archive_query(),
        ok={"200": _json("A page of archived jobs", _ref("ArchivePage"))},
        errors=(*_ANY, 404, 503),
    )
    yield _op(
        "get",
        "/stats",
        "getStats",
        "monitoring",
        "What every queue holds and does, and the live daemons",
        ok={"200": _json("The statistics document", _ref("Stats"))},
        errors=_REDIS,
    )
    yield _op(
        "get",
        "/health",
        "getHealth",
        "monitoring",
        "Whether this daemon can take work: Redis answers, and it is not stopping",
        ok={
            "200": _json("Healthy", _ref("Healthy")),
            "503": _json("Not healthy, and why", _ref("Unhealthy")),
        },
        errors=_ANY,
    )
    yield _op(
        "get",
        "/metrics",
        "getMetrics",
        "monitoring",
        "Prometheus metrics",
        ok={"200": _content("Prometheus text exposition", {"text/plain": {"type": "string"}})},
        errors=_REDIS,
    )
    yield _op(
        "get",
        "/schedules",
        "listSchedules",
        "monitoring",
        "The recurring schedules, with their next and last runs",
        ok={"200": _json("The schedules", _ref("Schedules"))},
        errors=_REDIS,
    )
    for action, paused in (("pause", True), ("resume", False)):
        yield _op(
            "post",
            f"/queues/{{queue}}/{action}",
            f"{action}Queue",
            "queues",
            f"{action.capitalize()} a queue (one that is configured or was used)",
            parameters=[queue],
            ok={"200": _json(f"The queue, {action}d", _ref("Paused" if paused else "Resumed"))},
            errors=(*_REDIS, 403, 404),
        )
    yield _op(
        "delete",
        "/queues/{queue}",
        "forgetQueue",
        "queues",
        "Forget a queue that no live daemon serves and that holds nothing",
        parameters=[queue],
        ok={"200": _json("Forgotten", _ref("Forgotten"))},
        errors=(*_REDIS, 403, 404, 409),
    )
    yield _op(
        "delete",
        "/queues/{queue}/jobs",
        "purgeQueue",
        "queues",
        "Delete a queue's queued or scheduled jobs, or its dead letters, in batches",
        parameters=[
            queue,
            {
                **_query_param("state", {"enum": list(PURGEABLE)}, "what to delete"),
                "required": True,
            },
        ],
        ok={"200": _json("How many went", _ref("Purged"))},
        errors=(*_REDIS, 403, 404),
    )
    yield _op(
        "post",
        "/dead/retry",
        "retryDeadLetters",
        "jobs",
        "Put dead letters back on their queues, of a type and a queue or all, in batches",
        parameters=_dead_filters(),
        body=_ref("DeadFilters"),
        body_required=False,
        ok={"200": _json("How many went back", _ref("RetriedDead"))},
        errors=(*_REDIS, 403, 404, 413, 415),
    )
    yield _op(
        "get",
        "/openapi.json",
        "getOpenApi",
        "meta",
        "This document",
        ok={"200": _json("The OpenAPI document", {"type": "object"})},
        errors=_ANY,
    )
    yield _op(
        "get",
        "/",
        "dashboardPage",
        "dashboard",
        "The dashboard's page",
        ok={"200": _content("The page", {"text/html": {"type": "string"}})},
        errors=_ANY,
    )
    yield _op(
        "get",
        "/static/{name}",
        "dashboardFile",
        "dashboard",
        "A file of the dashboard's page",
        parameters=[_path_param("name", {"type": "string"}, "the file's name")],
        ok={
            "200": _content(
                "The file",
                {kind: {"type": "string"} for kind in sorted(set(CONTENT_TYPES.values()))},
            )
        },
        errors=(*_ANY, 404),
    )
    yield _op(
        "get",
        "/events",
        "dashboardEvents",
        "dashboard",
        "The dashboard's server-sent events: a `picture` event a second, until either side"
        " closes (its data: stats, the latest jobs and failures, the schedules)",
        ok={"200": _content("The stream", {"text/event-stream": {"type": "string"}})},
        errors=_ANY,
    )


def _op(
    method: str,
    path: str,
    operation_id: str,
    tag: str,
    summary: str,
    *,
    ok: dict[str, Any],
    errors: Iterable[int],
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    body_required: bool = True,
) -> tuple[str, str, dict[str, Any]]:
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {JSON: {"schema": body}},
        }
    operation["responses"] = dict(ok)
    _add_errors(operation, errors)
    return path, method, operation


def _add_errors(operation: dict[str, Any], statuses: Iterable[int]) -> None:
    responses = operation["responses"]
    for status in statuses:
        name = _ERROR_RESPONSES[status]
        responses.setdefault(str(status), {"$ref": f"#/components/responses/{name}"})
    operation["responses"] = dict(sorted(responses.items()))


def _error_responses() -> dict[str, Any]:
    """One response per error status, its codes those ERRORS gives that status."""
    responses = {}
    for status, name in _ERROR_RESPONSES.items():
        codes = {code: when for code, (of, when) in ERRORS.items() if of == status}
        schema = {
            "allOf": [_ref("Error")],
            "properties": {"error": {"properties": {"code": {"enum": list(codes)}}}},
        }
        response: dict[str, Any] = {
            "description": "; ".join(f"`{code}`: {when}" for code, when in codes.items()),
            "content": {JSON: {"schema": schema}},
        }
        if status == 503:
            response["headers"] = {
                "Retry-After": {
                    "description": "seconds to wait before trying again",
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        responses[name] = response
    return responses


def _json(
    description: str,
    schema: dict[str, Any],
    *,
    location: bool = False,
    links: dict[str, Any] | None = None,
) -> dict[str, Any]:
    response = _content(description, {JSON: schema})
    if location:
        response["headers"] = {
            "Location": {"description": "the job's URL", "schema": {"type": "string"}}
        }
    if links:
        response["links"] = links
    return response


def _links(job_id: str) -> dict[str, Any]:
    """What a client may do next with the job whose id `job_id` (a runtime expression) gives."""
    return {
        name: {"operationId": operation, "parameters": {"id": job_id}}
        for name, operation in (
            ("GetJob", "getJob"),
            ("CancelJob", "cancelJob"),
            ("RetryJob", "retryJob"),
            ("DeleteJob", "deleteJob"),
        )
    }


def _content(description: str, kinds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {kind: {"schema": schema} for kind, schema in kinds.items()},
    }


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": SCHEMAS + name}


def _path_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def _query_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


def _idempotency_header() -> dict[str, Any]:
    return {
        "name": "Idempotency-Key",
        "in": "header",
        "description": "the same as the body's `idempotency_key` (given both, they must agree)",
        "schema": _idempotency_key(),
    }


def _trace_headers() -> list[dict[str, Any]]:
    """W3C Trace Context: the submitter's span, the parent of the job's (with [tracing]).
    An invalid one is ignored, as the standard asks: it never fails a request."""
    return [
        {
            "name": name,
            "in": "header",
            "description": f"W3C Trace Context `{name}`; a job's own `trace` field wins",
            "schema": {"type": "string"},
        }
        for name in TRACE_FIELDS
    ]


def _listing(*, with_state: bool) -> list[dict[str, Any]]:
    """The query of a listing. An empty value is as good as none (a form sends them)."""
    # A cursor is the last id of a page, or for finished jobs "<finish ms>-<id>".
    cursors = CURSOR_PATTERNS if with_state else CURSOR_PATTERNS[1:]
    params = [
        _query_param("queue", {"type": "string"}, "only this queue's jobs (default: every queue)")
    ]
    if with_state:
        states = {"enum": ["", *STATES]}
        params.append(_query_param("state", states, "only jobs in this state"))
    params += [
        _query_param("type", {"type": "string"}, "only jobs of this type"),
        _query_param("limit", _limit(), "most jobs on the page"),
        _query_param("cursor", _or_empty(*cursors), "the previous page's `next_cursor`"),
    ]
    return params


def _archive_query() -> list[dict[str, Any]]:
    """The query of GET /archive. An empty value is as good as none."""
    # A time's "+hh:mm" offset typed unencoded in a URL arrives as a space: taken for "+".
    time = RFC3339_PATTERN.replace("[+-]", "[ +-]")
    return [
        _query_param("type", _or_empty(HANDLER_NAME.pattern), "only jobs of this type"),
        _query_param("queue", _or_empty(QUEUE_NAME.pattern), "only this queue's jobs"),
        _query_param("state", {"enum": ["", *FINAL_STATES]}, "only jobs that ended so"),
        *(
            _query_param(
                name,
                _or_empty(SECONDS.pattern, time),
                f"only jobs that finished {when}: RFC 3339 with an offset, or epoch seconds",
            )
            for name, when in (("since", "at or after"), ("until", "before (later than since)"))
        ),
        _query_param(
            "q",
            {"type": "string"},
            "only jobs whose payload contains this JSON value (PostgreSQL's jsonb @>)",
        ),
        _query_param("limit", _limit(), "most jobs on the page"),
        _query_param(
            "cursor", _or_empty(ARCHIVE_CURSOR.pattern), "the previous page's `next_cursor`"
        ),
    ]


def _dead_filters() -> list[dict[str, Any]]:
    """The filters of POST /dead/retry, in the query (or the body: given both, they agree)."""
    return [
        _query_param("type", _or_empty(HANDLER_NAME.pattern), "only dead letters of this type"),
        _query_param("queue", _or_empty(QUEUE_NAME.pattern), "only this queue's"),
    ]


def _or_empty(*patterns: str) -> dict[str, Any]:
    """A string that is empty or matches one of these (whole) patterns."""
    return {"type": "string", "pattern": "|".join(["^$", *(f"^({p})$" for p in patterns)])}


def _limit() -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 1,
        "maximum": LIST_LIMIT_MAX,
        "default": LIST_LIMIT_DEFAULT,
    }


# Schemas.


def _schemas(server: ServerConfig, job_types: Collection[str]) -> dict[str, Any]:
    return {
        "Error": _error(),
        "Submission": _submission(sorted(job_types)),
        "Batch": _object(
            {
                "jobs": {
                    "type": "array",
                    "items": _ref("Submission"),
                    "minItems": 1,
                    "maxItems": server.max_batch,
                }
            },
            description="Validated as a whole: one bad job refuses the batch (422 names its"
            " index, e.g. `jobs[3]: ...`), and nothing is enqueued.",
        ),
        "BatchIds": _object(
            {"ids": {"type": "array", "items": _id()}},
            description="A job whose idempotency key was seen before answers the first job's id.",
        ),
        "Job": _job(),
        "ArchivedJob": _job(archived=True),
        "HistoryEntry": _history_entry(),
        "Progress": _object(
            {
                "value": {"type": "number"},
                "message": {"type": "string"},
                "at": _time(),
            },
            description="A Python handler's latest report.",
        ),
        "JobPage": _object(
            {
                "jobs": {"type": "array", "items": _ref("Job")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "pass it as `cursor` for the next page; null: no more",
                },
            }
        ),
        "ArchivePage": _object(
            {
                "jobs": {"type": "array", "items": _ref("ArchivedJob")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "pass it as `cursor` for the next page; null: no more",
                },
            }
        ),
        "Deleted": _object({"id": _id(), "deleted": {"const": True}}),
        "Purged": _object(
            {"queue": _queue_name(), "state": {"enum": list(PURGEABLE)}, "removed": _count()}
        ),
        "DeadFilters": _object(
            {
                name: {"anyOf": [param["schema"], {"type": "null"}]}
                for name, param in ((p["name"], p) for p in _dead_filters())
            },
            description="The filters of POST /dead/retry as a body; none, null or empty: any.",
            required=False,
        ),
        "RetriedDead": _object(
            {
                "retried": _count(),
                "queue": {"anyOf": [_queue_name(), {"type": "null"}]},
                "type": {"type": ["string", "null"]},
            }
        ),
        "Paused": _object({"queue": _queue_name(), "paused": {"const": True}}),
        "Resumed": _object({"queue": _queue_name(), "paused": {"const": False}}),
        "Forgotten": _object({"queue": _queue_name(), "forgotten": {"const": True}}),
        "Healthy": _object({"status": {"const": "ok"}}),
        "Unhealthy": _object(
            {
                "status": {"enum": ["stopping", "unavailable", "storage_full"]},
                "reason": {"type": "string"},
            }
        ),
        "Schedules": _object({"schedules": {"type": "array", "items": _schedule()}}),
        **_stats(),
    }


def _object(
    properties: dict[str, Any], *, description: str | None = None, required: bool = True
) -> dict[str, Any]:
    """An object of exactly these properties: every one present (unless told otherwise),
    no other."""
    schema: dict[str, Any] = {"type": "object"}
    if description is not None:
        schema["description"] = description
    schema["properties"] = properties
    if required:
        schema["required"] = list(properties)
    schema["additionalProperties"] = False
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _count() -> dict[str, Any]:
    return {"type": "integer", "minimum": 0}


def _id() -> dict[str, Any]:
    return {"type": "string", "pattern": f"^{ID_PATTERN}$", "description": "a UUIDv7"}


def _time() -> dict[str, Any]:
    return {"type": "string", "format": "date-time"}


def _queue_name() -> dict[str, Any]:
    return {"type": "string", "pattern": f"^{QUEUE_NAME.pattern}$"}


def _idempotency_key() -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_IDEMPOTENCY_KEY,
        "description": "printable characters",
    }


def _error() -> dict[str, Any]:
    codes = ", ".join(f"`{code}` ({status})" for code, (status, _) in ERRORS.items())
    return _object(
        {
            "error": _object(
                {
                    "code": {
                        "type": "string",
                        "description": f"for programs to match on: {codes}; `{FALLBACK_CODE}`"
                        " for any other status aiohttp answers",
                    },
                    "message": {"type": "string", "description": "for people"},
                }
            )
        },
        description="Every error the API answers.",
    )


def _submission(job_types: list[str]) -> dict[str, Any]:
    low, high = PRIORITIES[0], PRIORITIES[-1]
    properties: dict[str, Any] = {
        "type": {"enum": job_types, "description": "a configured handler's name"},
        "payload": {
            "description": f"any JSON (default null), nested at most {MAX_DEPTH} levels of"
            " objects and arrays, integers from -2^63 to 2^64-1",
        },
        "delay": _nullable(
            {
                "type": "number",
                "minimum": 0,
                "maximum": MAX_DELAY,
                "description": "seconds from now",
            }
        ),
        "run_at": _nullable(
            {
                "anyOf": [
                    {"type": "string", "pattern": f"^{RFC3339_PATTERN}$"},
                    {"type": "number", "minimum": 0, "exclusiveMaximum": MAX_RUN_AT_EPOCH},
                ],
                "description": "RFC 3339 with an offset, or epoch seconds; in the past: now;"
                f" at most {MAX_DELAY} seconds ahead",
            }
        ),
        "max_attempts": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_ATTEMPTS,
            "description": "default: the handler's; written without a fraction",
        },
        "idempotency_key": _nullable(_idempotency_key()),
        "callback_url": _nullable(
            {
                "type": "string",
                "maxLength": MAX_URL,
                "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]",
                "description": "http or https, to a destination [callbacks] permits",
            }
        ),
        "priority": _nullable(
            {
                "type": "integer",
                "minimum": low,
                "maximum": high,
                "default": DEFAULT_PRIORITY,
                "description": "higher first; written without a fraction",
            }
        ),
        "trace": _nullable(
            {
                "type": "object",
                "properties": {name: {"type": ["string", "null"]} for name in TRACE_FIELDS},
                "additionalProperties": False,
                "description": "the submitter's W3C Trace Context, as its headers would carry"
                " it (an invalid traceparent is ignored); wins over the request's headers",
            }
        ),
    }
    return {
        "type": "object",
        "description": "A new job. A key given twice keeps its last value.",
        "properties": properties,
        "required": ["type"],
        "additionalProperties": False,
        # Either delay or run_at, not both (a null is as good as an absent field).
        "not": {
            "required": ["delay", "run_at"],
            "properties": {"delay": {"type": "number"}, "run_at": {"type": ["string", "number"]}},
        },
    }


def _job(*, archived: bool = False) -> dict[str, Any]:
    """The job document; `archived`: as the archive answers it, which says so, and keeps
    nothing of what the job was doing in Redis (run_at, progress, waiting_for: null)."""
    nullable_text = {"type": ["string", "null"]}
    marked = {"archived": {"const": True}} if archived else {}
    description = "A job; times are RFC 3339, UTC, with milliseconds."
    if archived:
        description = "A job as the archive keeps it: its latest end."
    return _object(
        {
            "id": _id(),
            "type": {"type": "string"},
            "queue": _queue_name(),
            "state": {"enum": list(STATES)},
            "payload": {},
            "attempts": {"type": "integer", "minimum": 0, "description": "started so far"},
            "created_at": _time(),
            "started_at": _nullable(_time()),
            "finished_at": _nullable(_time()),
            "result": {"description": "what the handler returned"},
            "error": {**nullable_text, "description": "why the latest attempt failed"},
            "daemon": {**nullable_text, "description": "which daemon ran the latest attempt"},
            "max_attempts": {"type": "integer", "minimum": 1},
            "run_at": {**_nullable(_time()), "description": "when a scheduled job is due"},
            "cancel_requested": {"type": "boolean"},
            "idempotency_key": nullable_text,
            "callback_url": nullable_text,
            "priority": {"type": "integer", "minimum": PRIORITIES[0], "maximum": PRIORITIES[-1]},
            "waiting_for": {
                "enum": ["rate_limit", "concurrency", None],
                "description": "the limit of its type a ready job waits for",
            },
            "progress": _nullable(_ref("Progress")),
            "history": {"type": "array", "items": _ref("HistoryEntry")},
            **marked,
        },
        description=description,
    )


def _history_entry() -> dict[str, Any]:
    return _object(
        {
            "attempt": {"type": "integer", "minimum": 0},
            "daemon": {"type": ["string", "null"]},
            "started_at": _nullable(_time()),
            "finished_at": _nullable(_time()),
            "outcome": {"enum": ["completed", "retry", "failed", "cancelled", "lost"]},
            "error": {"type": ["string", "null"]},
        },
        description="One finished attempt (`lost`: its daemon died).",
    )


def _schedule() -> dict[str, Any]:
    return _object(
        {
            "name": {"type": "string"},
            "cron": {"type": "string"},
            "timezone": {"type": "string"},
            "type": {"type": "string"},
            "queue": _queue_name(),
            "catch_up": {"enum": ["none", "latest"]},
            "next_run": _nullable(_time()),
            "last_run": _nullable(_time()),
            "last_job": _nullable(_object({"id": _id(), "state": {"enum": list(STATES)}})),
        }
    )


def _autoscale(*, fleet: bool) -> dict[str, Any]:
    """The sizing hint of a queue, or of the whole fleet (with the [autoscale] bounds)."""
    rate = {"type": "number", "minimum": 0}
    hint: dict[str, Any] = {
        "backlog": _count(),
        "arrival_per_s": rate,
        "completion_per_s": rate,
        "drain_s": {"type": ["number", "null"], "description": "null: never, at these rates"},
        "daemons": _count(),
        "daemons_needed": {"type": ["number", "null"], "description": "null: cannot be told"},
        "desired_daemons": _count(),
    }
    if fleet:
        hint |= {"target_drain_s": rate, "min_daemons": _count(), "max_daemons": _count()}
    else:
        hint["per_daemon_per_s"] = {"type": ["number", "null"]}
    return _object(hint, description="The sizing hint (docs/operations.md#autoscaling)")


def _stats() -> dict[str, Any]:
    count = _count()
    percentiles = _object({p: {"type": ["integer", "null"]} for p in ("p50", "p95", "p99")})
    queue = _object(
        {
            **{state: count for state in ("queued", "scheduled", "active", *FINAL_STATES)},
            "totals": _object({name: count for name in TOTALS}),
            "callbacks_pending": count,
            "paused": {"type": "boolean"},
            "throughput": _object({"1m": {"type": "number"}, "5m": {"type": "number"}}),
            "wait_ms": percentiles,
            "run_ms": percentiles,
            "limits": {"type": "object", "additionalProperties": _ref("TypeLimitStatus")},
            "autoscale": _autoscale(fleet=False),
            "no_handler": {
                "type": "object",
                "additionalProperties": _object({"job": _id(), "wait_ms": count}),
            },
        },
    )
    return {
        "Stats": _object(
            {
                "time": _time(),
                "queues": {"type": "object", "additionalProperties": _ref("QueueStats")},
                "instances": {"type": "array", "items": _ref("Instance")},
                "autoscale": _autoscale(fleet=True),
                "redis": _ref("RedisInfo"),
                "archive": _object(
                    {
                        "pending": count,
                        "oldest_age_s": {"type": ["number", "null"]},
                    },
                    description="Finished jobs waiting to be archived, and how long ago the"
                    " oldest ended (null: none waits)",
                ),
            },
            description="The same from every daemon sharing the Redis.",
        ),
        "QueueStats": queue,
        "TypeLimitStatus": _object(
            {
                "global_concurrency": {"type": ["integer", "null"]},
                "rate_limit": {"type": ["string", "null"]},
                "running": count,
                "held": count,
                "started_in_window": count,
                "rate_limited": count,
                "concurrency_limited": count,
            }
        ),
        "Instance": _object(
            {
                "id": {"type": "string"},
                "host": {"type": "string"},
                "pid": {"type": "integer"},
                "concurrency": {"type": "integer"},
                "active": count,
                "queues": {"type": "array", "items": {"type": "string"}},
                "types": {"type": "array", "items": {"type": "string"}},
                "started_at": _time(),
                "uptime_s": {"type": "number"},
                "last_heartbeat": _time(),
                "heartbeat_age_ms": {"type": "integer"},
            }
        ),
        "RedisInfo": {
            "type": "object",
            "properties": {
                "version": {"type": ["string", "null"]},
                "used_memory": {"type": ["integer", "null"]},
                "nodes": {"type": "integer", "description": "of a Redis Cluster: its primaries"},
            },
            "required": ["version", "used_memory"],
            "additionalProperties": False,
        },
    }
