"""The HTTP intake: the aiohttp app that takes jobs and answers questions about them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import orjson
from aiohttp import web

from taskd.config import HandlerConfig, ServerConfig
from taskd.jobs import QUEUED, Job, format_ms, new_id, now_ms
from taskd.store import UNAVAILABLE, Store

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0
_HEALTH_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *UNAVAILABLE)
SUBMIT_FIELDS = frozenset({"type", "payload"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message"}}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status)


# aiohttp's own errors (unknown route, wrong method, body too large) keep their status
# but get our JSON body and a code a program can match on.
_HTTP_CODES = {
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "this endpoint does not take that method"),
    413: ("body_too_large", "the request body is larger than [server] max_body allows"),
}


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure with the JSON error body, and keep serving."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        if exc.status == 413:
            message = f"{message} ({exc.text})"
        return error_response(exc.status, code, message)
    except UNAVAILABLE as exc:
        logger.warning("%s %s: Redis unreachable: %s", request.method, request.path, exc)
        return error_response(503, "unavailable", f"Redis is unreachable: {exc}")
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error; see the daemon's log")


class Intake:
    """Serves the HTTP API on the configured address until cancelled."""

    def __init__(
        self,
        *,
        store: Store,
        server: ServerConfig,
        handlers: Mapping[str, HandlerConfig],
        queues: frozenset[str],
        dead_after: float,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._server = server
        self._handlers = handlers
        self._queues = queues
        self._dead_after_ms = int(dead_after * 1000)
        self._clock = clock
        self._accepting = True
        self.addresses: list[Any] = []
        self.app = self._make_app()

    def refuse_new(self) -> None:
        """Answer new submissions with 503 from now on (the daemon is stopping)."""
        self._accepting = False

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self._server.max_body, middlewares=[errors_as_json])
        app.router.add_post("/jobs", self.submit)
        app.router.add_get("/jobs/{id}", self.get_job)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/health", self.health)
        return app

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report started once bound, serve until cancelled, then close."""
        # No access log: one line per request would cost more than the request itself at
        # thousands of submissions a second. Failures are logged where they happen.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site: web.BaseSite
            if self._server.unix_path is not None:
                site = web.UnixSite(runner, self._server.unix_path)
            else:
                site = web.TCPSite(runner, self._server.host, self._server.port)
            await site.start()
            self.addresses = list(runner.addresses)
            logger.info("intake listening on %s", ", ".join(map(str, self.addresses)))
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    async def submit(self, request: web.Request) -> web.Response:
        if not self._accepting:
            raise ApiError(503, "shutting_down", "this daemon is shutting down; submit to another")
        job_type, payload = self._parse_submission(await request.read())
        handler = self._handlers[job_type]
        job = Job(
            id=new_id(),
            type=job_type,
            queue=handler.queue,
            payload=payload,
            state=QUEUED,
            attempts=0,
            created_at=self._clock(),
        )
        await self._store.enqueue(job)
        return json_response(job.to_public(), status=201, headers={"Location": f"/jobs/{job.id}"})

    def _parse_submission(self, body: bytes) -> tuple[str, Any]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                400, "invalid_json", f"the request body is not valid JSON: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_job", "the request body must be a JSON object")
        unknown = sorted(set(data) - SUBMIT_FIELDS)
        if unknown:
            raise ApiError(
                422,
                "invalid_job",
                f"unknown field(s) {', '.join(unknown)}; a job takes type, payload",
            )
        job_type = data.get("type")
        if job_type is None:
            raise ApiError(
                422, "invalid_job", "missing field 'type': the name of a configured handler"
            )
        if not isinstance(job_type, str):
            raise ApiError(
                422, "invalid_job", f"field 'type' must be a string, got {_json_kind(job_type)}"
            )
        if job_type not in self._handlers:
            known = ", ".join(sorted(self._handlers))
            raise ApiError(
                422, "unknown_type", f"unknown job type '{job_type}'; configured types: {known}"
            )
        return job_type, data.get("payload")

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        queues = self._queues | await self._store.known_queues()
        job = await self._store.get_job(job_id, sorted(queues))
        if job is None:
            raise ApiError(404, "not_found", f"no job with id '{job_id}'")
        return json_response(job.to_public())

    async def stats(self, request: web.Request) -> web.Response:
        daemons = await self._store.live_daemons(since=self._clock() - self._dead_after_ms)
        queues = sorted(self._queues | await self._store.known_queues())
        counts = await self._store.queue_counts(queues, daemons)
        instances = [
            {
                "id": d.id,
                "host": d.host,
                "pid": d.pid,
                "concurrency": d.concurrency,
                "active": d.active,
                "queues": list(d.queues),
                "started_at": format_ms(d.started_at),
                "last_heartbeat": format_ms(d.last_heartbeat),
            }
            for d in daemons
        ]
        return json_response({"queues": counts, "instances": instances})

    async def health(self, request: web.Request) -> web.Response:
        if not self._accepting:
            return json_response({"status": "stopping", "reason": "shutting down"}, status=503)
        try:
            with anyio.fail_after(HEALTH_TIMEOUT):
                await self._store.ping()
        except _HEALTH_ERRORS as exc:
            return json_response(
                {"status": "unavailable", "reason": f"Redis does not answer: {exc!r}"}, status=503
            )
        return json_response({"status": "ok"})


def _json_kind(value: Any) -> str:
    kinds = {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
