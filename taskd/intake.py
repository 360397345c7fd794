"""The HTTP intake: the aiohttp app that takes jobs and answers questions about them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import orjson
from aiohttp import web

from taskd.config import HandlerConfig, ServerConfig
from taskd.jobs import FAILED, Job, format_ms, now_ms
from taskd.store import UNAVAILABLE, Store
from taskd.validation import ApiError, parse_list_query, parse_submission

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0
_HEALTH_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *UNAVAILABLE)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        on_scheduled: Callable[[str, int], None] = lambda queue, due: None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._server = server
        self._handlers = handlers
        self._queues = queues
        self._dead_after_ms = int(dead_after * 1000)
        self._on_scheduled = on_scheduled
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
        app.router.add_get("/jobs", self.list_jobs)
        app.router.add_get("/jobs/{id}", self.get_job)
        app.router.add_delete("/jobs/{id}", self.delete_job)
        app.router.add_post("/jobs/{id}/cancel", self.cancel_job)
        app.router.add_post("/jobs/{id}/retry", self.retry_job)
        app.router.add_get("/dead", self.list_dead)
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
        job = parse_submission(await request.read(), self._handlers, self._clock())
        await self._store.enqueue(job)
        if job.run_at is not None:
            self._on_scheduled(job.queue, job.run_at)
        return json_response(job.to_public(), status=201, headers={"Location": f"/jobs/{job.id}"})

    async def get_job(self, request: web.Request) -> web.Response:
        return json_response((await self._find(request)).to_public())

    async def cancel_job(self, request: web.Request) -> web.Response:
        job = await self._find(request)
        before = await self._store.cancel(job.queue, job.id, self._clock())
        if before not in ("queued", "scheduled", "active"):
            raise _conflict(
                job.id, before, "only a queued, scheduled or active job can be cancelled"
            )
        # An active job is cancelled by the daemon running it, a moment later.
        status = 202 if before == "active" else 200
        return json_response((await self._find(request)).to_public(), status=status)

    async def retry_job(self, request: web.Request) -> web.Response:
        job = await self._find(request)
        before = await self._store.retry(job.queue, job.id)
        if before != FAILED:
            raise _conflict(job.id, before, "only a failed job can be retried")
        return json_response((await self._find(request)).to_public())

    async def delete_job(self, request: web.Request) -> web.Response:
        job = await self._find(request)
        before = await self._store.delete(job.queue, job.id)
        if before == "active":
            raise _conflict(job.id, before, "a running job cannot be deleted; cancel it first")
        if before == "missing":
            raise _not_found(job.id)
        return json_response({"id": job.id, "deleted": True})

    async def list_jobs(self, request: web.Request) -> web.Response:
        query = parse_list_query(request.query)
        queues = [query.queue] if query.queue else sorted(await self._all_queues())
        page = await self._store.list_jobs(
            queues,
            state=query.state,
            job_type=query.job_type,
            limit=query.limit,
            cursor=query.cursor,
        )
        return json_response(
            {"jobs": [j.to_public() for j in page.jobs], "next_cursor": page.cursor}
        )

    async def list_dead(self, request: web.Request) -> web.Response:
        """The dead letters: failed jobs, newest first (GET /jobs?state=failed)."""
        params = {**request.query, "state": FAILED}
        query = parse_list_query(params)
        queues = [query.queue] if query.queue else sorted(await self._all_queues())
        page = await self._store.list_jobs(
            queues, state=FAILED, job_type=query.job_type, limit=query.limit, cursor=query.cursor
        )
        return json_response(
            {"jobs": [j.to_public() for j in page.jobs], "next_cursor": page.cursor}
        )

    async def _find(self, request: web.Request) -> Job:
        job_id = request.match_info["id"]
        job = await self._store.get_job(job_id, sorted(await self._all_queues()))
        if job is None:
            raise _not_found(job_id)
        return job

    async def _all_queues(self) -> set[str]:
        return set(self._queues) | await self._store.known_queues()

    async def stats(self, request: web.Request) -> web.Response:
        daemons = await self._store.live_daemons(since=self._clock() - self._dead_after_ms)
        counts = await self._store.queue_counts(sorted(await self._all_queues()))
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


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job with id '{job_id}'")


def _conflict(job_id: str, state: str, rule: str) -> ApiError:
    return ApiError(409, "conflict", f"job '{job_id}' is {state}: {rule}")
