"""The HTTP API: the aiohttp app that takes jobs, answers about them, serves admin and dashboard."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from taskd.archive_reads import ArchiveReads
from taskd.config import AutoscaleConfig, HandlerConfig, ServerConfig
from taskd.connections import Runner
from taskd.dashboard import Dashboard
from taskd.egress import DEFAULT_POLICY, Policy
from taskd.guards import browser_guard, require_json, token_guard
from taskd.jobs import FAILED, Job, now_ms
from taskd.metrics import Metrics
from taskd.openapi import describe
from taskd.sizing import desired_daemons, fleet_load
from taskd.stats import archive_backlog, autoscale_loads, no_handler, snapshot
from taskd.store import UNAVAILABLE, Inspector, Store, is_full
from taskd.timeouts import Timeouts
from taskd.validation import (
    ApiError,
    parse_batch,
    parse_dead_retry,
    parse_list_query,
    parse_purge_query,
    parse_submission,
    trace_context,
    valid_queue,
)

if TYPE_CHECKING:  # psycopg and opentelemetry, which they import, are optional extras
    from taskd.archive import Archive
    from taskd.tracing import Tracing

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0
EVENT_GRACE = 2.0
_HEALTH_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *UNAVAILABLE)
_BATCH_ERRORS = _HEALTH_ERRORS


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


class RedisDeadline(Exception):
    """A request waited for Redis longer than [redis] request_timeout."""


# What may stop a listing's clean-up (Api._take_out_gone) without failing the listing.
_LISTING_CLEANUP_ERRORS: tuple[type[Exception], ...] = (*UNAVAILABLE, RedisDeadline)


# Set by redis_deadline for each GET it serves, in the request's own task: ends the
# request's deadline (see done_with_redis).
_end_deadline: ContextVar[Callable[[], None]] = ContextVar("end_deadline")


def done_with_redis() -> None:
    """The GET request this task serves waits for Redis no more: its deadline is over.
    What it waits for next (the archive) has a bound and an error of its own, and must
    not be answered as a Redis that did not answer."""
    end = _end_deadline.get(None)
    if end is not None:
        end()


def redis_deadline(seconds: float) -> Middleware:
    """Middleware: a request that waits for Redis longer than `seconds` is answered 503 at
    once, rather than left hanging through an outage (a blackholed network holds commands
    until the socket timeout). The event stream is long-lived by design; /health has its
    own bound."""
    # One timer for every request's deadline, not an asyncio.timeout each (see Timeouts).
    expired: set[asyncio.Task[Any]] = set()

    def expire(task: asyncio.Task[Any]) -> None:
        expired.add(task)
        task.cancel()

    deadlines = Timeouts[asyncio.Task[Any]](expire=expire)

    def passed(task: asyncio.Task[Any]) -> bool:
        """Forget a request's deadline: whether it had passed, and cancelled its task."""
        deadlines.end(task, seconds)
        if task in expired:
            expired.remove(task)
            return True
        return False

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/events", "/health"):
            return await handler(request)
        # The loop from the request's own task: asyncio.get_running_loop(), which
        # current_task() calls without one, makes a system call (getpid) on Python 3.11.
        task = asyncio.current_task(request.task.get_loop())
        assert task is not None
        cancelling = task.cancelling()
        deadlines.start(task, seconds)
        # Only reads (the archive's) and the bulk writes (each of whose batches has its own
        # bound: _in_batches) end their deadline early; a submission need not pay.
        if request.method in ("GET", "DELETE") or request.path == "/dead/retry":
            _end_deadline.set(partial(deadlines.end, task, seconds))
        try:
            return await handler(request)
        except asyncio.CancelledError:
            # Ours, as asyncio.timeout tells its own: the deadline cancelled the task, and
            # no one else did as well.
            if passed(task) and task.uncancel() <= cancelling:
                raise RedisDeadline(
                    f"Redis did not answer within {seconds:g} s ([redis] request_timeout)"
                ) from None
            raise
        finally:
            if passed(task):
                task.uncancel()

    return deadline


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
        # A 405 must say which methods the endpoint takes (RFC 9110): aiohttp's Allow.
        allow = exc.headers.get("Allow")
        return error_response(exc.status, code, message, {"Allow": allow} if allow else None)
    except UNAVAILABLE as exc:
        if request.transport is None:
            # Not Redis: the connection closed while the body was read (the client went,
            # or was cut off as too slow, see taskd.connections). No one is left to answer.
            return error_response(400, "connection_closed", "the connection closed")
        logger.warning("%s %s: Redis unreachable: %s", request.method, request.path, exc)
        return error_response(503, "unavailable", f"Redis is unreachable: {exc}")
    except RedisDeadline as exc:
        logger.warning("%s %s: %s", request.method, request.path, exc)
        return error_response(503, "unavailable", str(exc), {"Retry-After": "1"})
    except Exception as exc:
        if is_full(exc):
            # Neither our error nor the request's: say so, and when to try again.
            logger.warning("%s %s: Redis is full (maxmemory)", request.method, request.path)
            message = "Redis is full (maxmemory reached): nothing is stored until it has room"
            return error_response(503, "storage_full", message, {"Retry-After": "5"})
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error; see the daemon's log")


async def _no_schedules() -> list[dict[str, Any]]:
    return []


class HttpApi:
    """Serves the HTTP API on the configured address until cancelled."""

    def __init__(
        self,
        *,
        store: Store,
        inspector: Inspector,
        server: ServerConfig,
        handler_configs: Mapping[str, HandlerConfig],
        queues: frozenset[str],
        dead_after: float,
        metrics: Metrics,
        active: Callable[[], int],
        on_scheduled: Callable[[str, int], None] = lambda queue, due: None,
        on_final: Callable[[Job], None] | None = None,
        schedules: Callable[[], Awaitable[list[dict[str, Any]]]] = _no_schedules,
        clock: Callable[[], int] = now_ms,
        egress: Policy = DEFAULT_POLICY,
        request_timeout: float = 2.0,
        archive: Archive | None = None,
        autoscale: AutoscaleConfig | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._archived = ArchiveReads(archive=archive)  # finished jobs Redis let go
        self._autoscale = autoscale or AutoscaleConfig()  # the sizing hint's target, bounds
        self._tracing = tracing  # None: off
        self._schedules = schedules  # the /schedules view, one entry a schedule
        self._egress = egress  # what callback_urls may name
        self._on_final = on_final
        self._metrics = metrics
        self._active = active
        self._store = store  # for the writes; every read goes through the inspector
        self._inspector = inspector
        self._server = server
        self._request_timeout = request_timeout
        self._handler_configs = handler_configs
        self._queues = queues
        self._dead_after_ms = int(dead_after * 1000)
        self._dedup_ttl_ms = int(server.idempotency_ttl * 1000)
        self._on_scheduled = on_scheduled
        self._clock = clock
        self._accepting = True
        self.addresses: list[Any] = []
        self._runner: Runner | None = None
        # It depends on the config alone: built once, answered as is.
        self._openapi = orjson.dumps(describe(server=server, job_types=handler_configs))
        self.app = self._make_app()

    @property
    def open_connections(self) -> int:
        """HTTP connections open now (0 before the API listens)."""
        return self._runner.open_connections if self._runner is not None else 0

    def refuse_new(self) -> None:
        """Answer new submissions with 503 from now on (the daemon is stopping)."""
        self._accepting = False

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise ApiError(503, "shutting_down", "this daemon is shutting down; submit to another")

    def _make_app(self) -> web.Application:
        middlewares = [
            errors_as_json,
            redis_deadline(self._request_timeout),
            browser_guard(self._server),
        ]
        if self._server.token is not None:
            # Without a token it lets everything through: not a layer every request crosses.
            middlewares.append(token_guard(self._server))
        app = web.Application(client_max_size=self._server.max_body, middlewares=middlewares)
        Dashboard(picture=self.picture, stopping=lambda: not self._accepting).add_routes(app)
        app.router.add_post("/jobs", self.submit)
        app.router.add_post("/jobs/batch", self.submit_batch)
        app.router.add_get("/jobs", self.list_jobs)
        app.router.add_get("/jobs/{id}", self.get_job)
        app.router.add_get("/archive", self.list_archive)
        app.router.add_delete("/jobs/{id}", self.delete_job)
        app.router.add_post("/jobs/{id}/cancel", self.cancel_job)
        app.router.add_post("/jobs/{id}/retry", self.retry_job)
        app.router.add_get("/dead", self.list_dead)
        app.router.add_post("/dead/retry", self.retry_dead)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/schedules", self.list_schedules)
        app.router.add_post("/queues/{queue}/pause", self.pause_queue)
        app.router.add_post("/queues/{queue}/resume", self.resume_queue)
        app.router.add_delete("/queues/{queue}", self.forget_queue)
        app.router.add_delete("/queues/{queue}/jobs", self.purge_queue)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report started once bound, serve until cancelled, then close."""
        # No access log: one line per request would cost more than the request itself at
        # thousands of submissions a second. Failures are logged where they happen.
        # Open requests get a short grace at close: by then the API has refused new work for
        # the whole drain, and event streams end by themselves once the daemon stops.
        # Idle and slow connections are closed, and past max_connections new ones are
        # refused, so that clients cannot use up the daemon's file descriptors.
        runner = Runner(
            self.app,
            max_connections=self._server.max_connections,
            read_timeout=self._server.request_read_timeout,
            keepalive_timeout=self._server.keepalive_timeout,
            shutdown_timeout=EVENT_GRACE,
            access_log=None,
        )
        self._runner = runner
        await runner.setup()
        try:
            site: web.BaseSite
            if self._server.unix_path is not None:
                site = web.UnixSite(runner, self._server.unix_path)
            else:
                site = web.TCPSite(runner, self._server.host, self._server.port)
            await site.start()
            self.addresses = list(runner.addresses)
            logger.info("HTTP API listening on %s", ", ".join(map(_address, self.addresses)))
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    async def submit(self, request: web.Request) -> web.Response:
        self._check_accepting()
        require_json(request)
        header = request.headers.get("Idempotency-Key")
        tracing = self._tracing
        job = parse_submission(
            await request.read(),
            self._handler_configs,
            self._clock(),
            header,
            egress=self._egress,
            traced=tracing is not None,
            trace=None if tracing is None else request_trace(request),
        )
        if tracing is None:
            return await self._submit(job)
        with tracing.submissions([job]) as [traced]:
            return await self._submit(traced)

    async def _submit(self, job: Job) -> web.Response:
        # Twice at most: a first job deleted between the two calls holds its key no more.
        for _ in range(2):
            holder = await self._store.enqueue(job, self._dedup_ttl_ms)
            if holder == job.id:
                break
            # A repeated submission: answer the job the first one created.
            first = await self._inspector.get_job(holder, [job.queue])
            if first is not None:
                return json_response(first.to_public(), headers={"Location": f"/jobs/{holder}"})
        else:
            raise ApiError(
                503, "unavailable", "the job holding this idempotency key keeps changing; retry"
            )
        self._metrics.enqueued(job.queue, job.type)
        if job.run_at is not None:
            self._on_scheduled(job.queue, job.run_at)
        return json_response(job.to_public(), status=201, headers={"Location": f"/jobs/{job.id}"})

    async def submit_batch(self, request: web.Request) -> web.Response:
        """Many jobs in one request: validated as a whole, then enqueued in few round trips."""
        self._check_accepting()
        require_json(request)
        body = await request.read()
        tracing = self._tracing
        jobs = parse_batch(
            body,
            self._handler_configs,
            self._clock(),
            self._server.max_batch,
            egress=self._egress,
            traced=tracing is not None,
            trace=None if tracing is None else request_trace(request),
        )
        if tracing is None:
            holders = await self._store.enqueue_many(jobs, self._dedup_ttl_ms)
        else:
            with tracing.submissions(jobs) as jobs:
                holders = await self._store.enqueue_many(jobs, self._dedup_ttl_ms)
        added = [job for job, holder in zip(jobs, holders, strict=True) if holder == job.id]
        for (queue, job_type), count in Counter((j.queue, j.type) for j in added).items():
            self._metrics.enqueued(queue, job_type, count)
        for job in added:
            if job.run_at is not None:
                self._on_scheduled(job.queue, job.run_at)
        return json_response({"ids": holders}, status=201)

    async def get_job(self, request: web.Request) -> web.Response:
        """The job from Redis, else (retention over, or deleted) from the archive."""
        job_id = request.match_info["id"]
        job = await self._inspector.get_job(job_id, sorted(await self._all_queues()))
        if job is not None:
            return json_response(job.to_public())
        done_with_redis()
        found = await self._archived.job(job_id)
        if found is None:
            raise _not_found(job_id)
        return json_response(found)

    async def list_archive(self, request: web.Request) -> web.Response:
        """Archived jobs, newest first by finish time, filtered and paged."""
        done_with_redis()
        return json_response(await self._archived.page(request.query))

    async def cancel_job(self, request: web.Request) -> web.Response:
        job = await self._find(request)
        before = await self._store.cancel(job.queue, job.id, self._clock())
        if before not in ("queued", "scheduled", "active"):
            raise _conflict(
                job.id, before, "only a queued, scheduled or active job can be cancelled"
            )
        after = await self._find(request)
        # An active job is cancelled by the daemon running it, a moment later (and that
        # daemon sends its callback); a waiting one is cancelled now, so we send it.
        if before != "active" and self._on_final is not None:
            self._on_final(after)
        return json_response(after.to_public(), status=202 if before == "active" else 200)

    async def retry_job(self, request: web.Request) -> web.Response:
        job = await self._find(request)
        before = await self._store.retry(job.queue, job.id, self._clock())
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
        return await self._listing(request.query)

    async def list_dead(self, request: web.Request) -> web.Response:
        """The dead letters: failed jobs, newest first (GET /jobs?state=failed)."""
        return await self._listing({**request.query, "state": FAILED})

    async def _listing(self, params: Mapping[str, str]) -> web.Response:
        query = parse_list_query(params)
        queues = [query.queue] if query.queue else sorted(await self._all_queues())
        page = await self._inspector.list_jobs(
            queues,
            state=query.state,
            job_type=query.job_type,
            limit=query.limit,
            cursor=query.cursor,
        )
        await self._take_out_gone(page.gone)
        return json_response(
            {"jobs": [j.to_public() for j in page.jobs], "next_cursor": page.cursor}
        )

    async def _find(self, request: web.Request) -> Job:
        job_id = request.match_info["id"]
        job = await self._inspector.get_job(job_id, sorted(await self._all_queues()))
        if job is None:
            raise _not_found(job_id)
        return job

    async def _all_queues(self) -> set[str]:
        return set(self._queues) | await self._inspector.known_queues()

    async def stats(self, request: web.Request) -> web.Response:
        return json_response(await self.snapshot())

    async def snapshot(self) -> dict[str, Any]:
        """The /stats document."""
        queues = sorted(await self._all_queues())
        return await snapshot(
            self._inspector,
            queues,
            now=self._clock(),
            dead_after_ms=self._dead_after_ms,
            handler_configs=self._handler_configs,
            autoscale=self._autoscale,
        )

    async def _take_out_gone(self, gone: Sequence[tuple[str, str]]) -> None:
        """Have the store take out of the index the ids a listing met with no record
        (Page.gone). The listing stands whatever this does: a full or unreachable Redis
        leaves them for the next one."""
        if not gone:
            return
        try:
            await self._store.unindex_gone(gone)
        except _LISTING_CLEANUP_ERRORS as exc:
            logger.warning("ids of deleted jobs stay in the index for now: %s", exc)
        except Exception as exc:
            if not is_full(exc):
                raise
            logger.warning("ids of deleted jobs stay in the index for now: Redis is full")

    async def picture(self) -> dict[str, Any]:
        """What the dashboard shows: stats, latest jobs and failures, the schedules, and
        whether there is an archive to search."""
        queues = sorted(await self._all_queues())
        recent = await self._inspector.list_jobs(
            queues, state=None, job_type=None, limit=20, cursor=None
        )
        await self._take_out_gone(recent.gone)
        dead = await self._inspector.list_jobs(
            queues, state=FAILED, job_type=None, limit=10, cursor=None
        )
        return {
            "schedules": await self._schedules(),
            "stats": await self.snapshot(),
            "recent": [job.to_public() for job in recent.jobs],
            "failed": [job.to_public() for job in dead.jobs],
            "archive": self._archived.configured,
        }

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus metrics: this daemon's, and the queue depths every daemon reports."""
        now = self._clock()
        queues = sorted(await self._all_queues())
        counts = await self._inspector.queue_counts(queues)
        live = await self._inspector.live_daemons(since=now - self._dead_after_ms)
        self._metrics.set_cluster(counts, len(live))
        self._metrics.set_without_handler(
            no_handler(await self._inspector.unhandled(queues), live, now)
        )
        self._metrics.set_active(self._active())
        backlog = await self._inspector.archive_backlog(queues)
        self._metrics.set_archive(archive_backlog(backlog, now))
        loads = await autoscale_loads(self._inspector, queues, counts, live, now, self._autoscale)
        fleet = fleet_load(list(loads.values()), live)
        self._metrics.set_desired_daemons(desired_daemons(fleet, self._autoscale))
        body, content_type = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def list_schedules(self, request: web.Request) -> web.Response:
        """Each recurring schedule with its next and last run and the last job's state."""
        return json_response({"schedules": await self._schedules()})

    async def pause_queue(self, request: web.Request) -> web.Response:
        # Only a queue that exists: a made-up name registered for good would weigh on
        # every /stats from then on.
        queue = await self._existing_queue(request)
        await self._store.pause(queue)
        logger.info("queue %s paused", queue)
        return json_response({"queue": queue, "paused": True})

    async def resume_queue(self, request: web.Request) -> web.Response:
        queue = await self._existing_queue(request)
        await self._store.resume(queue)
        logger.info("queue %s resumed", queue)
        return json_response({"queue": queue, "paused": False})

    async def forget_queue(self, request: web.Request) -> web.Response:
        """Forget a queue nothing serves and that holds nothing (no job of any state, no
        daemon lease, no callback waiting): /stats and the daemons stop looking at it."""
        queue = await self._existing_queue(request)
        if queue in self._queues:
            raise ApiError(409, "conflict", f"queue '{queue}' is in this daemon's config")
        live = await self._inspector.live_daemons(since=self._clock() - self._dead_after_ms)
        if serving := sorted(d.id for d in live if queue in d.queues):
            raise ApiError(409, "conflict", f"queue '{queue}' is served by {', '.join(serving)}")
        jobs, leases, callbacks = await self._store.forget_queue(queue)
        if jobs or leases or callbacks:
            held = f"{jobs} jobs, {leases} daemon leases and {callbacks} callbacks"
            raise ApiError(409, "conflict", f"queue '{queue}' still holds {held}")
        logger.info("queue %s forgotten", queue)
        return json_response({"queue": queue, "forgotten": True})

    async def purge_queue(self, request: web.Request) -> web.Response:
        """Delete a queue's queued or scheduled jobs, or its dead letters, in batches."""
        state = parse_purge_query(request.query)
        queue = await self._existing_queue(request)
        purged = self._store.purge(queue, state, self._clock())
        removed = await self._in_batches(purged, f"purge of the {state} jobs of '{queue}'")
        logger.info("queue %s: %d %s jobs purged", queue, removed, state)
        return json_response({"queue": queue, "state": state, "removed": removed})

    async def retry_dead(self, request: web.Request) -> web.Response:
        """Put dead letters back on their queues, of one queue and type or all, in batches."""
        if request.body_exists:
            require_json(request)
        which = parse_dead_retry(request.query, await request.read())
        if which.queue is None:
            queues = sorted(await self._all_queues())
        else:
            queues = [await self._known_queue(which.queue)]
        batches = self._retry_dead(queues, which.job_type, self._clock())
        retried = await self._in_batches(batches, "retry of dead letters")
        logger.info(
            "%d dead letters retried (queue %s, type %s)", retried, which.queue, which.job_type
        )
        return json_response({"retried": retried, "queue": which.queue, "type": which.job_type})

    async def _retry_dead(
        self, queues: Iterable[str], job_type: str | None, now: int
    ) -> AsyncIterator[int]:
        for queue in queues:
            async for retried in self._store.retry_dead(queue, now, job_type):
                yield retried

    async def _in_batches(self, batches: AsyncIterator[int], doing: str) -> int:
        """The sum of what each batch did. A purge of a million jobs takes longer than a
        request may wait for Redis, a batch does not: each gets [redis] request_timeout."""
        done_with_redis()
        total = 0
        while True:
            try:
                with anyio.fail_after(self._request_timeout):
                    count = await anext(batches)
            except StopAsyncIteration:
                return total
            except _BATCH_ERRORS as exc:
                raise ApiError(
                    503,
                    "unavailable",
                    f"the {doing} stopped after {total} jobs: Redis did not answer a batch"
                    f" within {self._request_timeout:g} s ([redis] request_timeout), or"
                    f" failed ({exc!r}); send it again for the rest",
                ) from exc
            total += count

    async def _existing_queue(self, request: web.Request) -> str:
        return await self._known_queue(_queue_name(request))

    async def _known_queue(self, queue: str) -> str:
        if queue not in await self._all_queues():
            raise ApiError(404, "not_found", f"no queue '{queue}' (none is configured or used)")
        return queue

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of this API, as this daemon is configured."""
        return web.Response(body=self._openapi, content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        if not self._accepting:
            return json_response({"status": "stopping", "reason": "shutting down"}, status=503)
        try:
            with anyio.fail_after(HEALTH_TIMEOUT):
                await self._store.check_writable()
        except _HEALTH_ERRORS as exc:
            return json_response(
                {"status": "unavailable", "reason": f"Redis does not answer: {exc!r}"}, status=503
            )
        except Exception as exc:
            if not is_full(exc):
                raise
            reason = "Redis is full (maxmemory): it refuses writes until memory is freed"
            return json_response({"status": "storage_full", "reason": reason}, status=503)
        return json_response({"status": "ok"})


def request_trace(request: web.Request) -> str | None:
    """The request's W3C trace context (traceparent and tracestate headers), as
    validation.trace_context makes it. A traceparent sent twice is invalid, so ignored;
    tracestate headers join into one (RFC 9110 field lines)."""
    parents = request.headers.getall("traceparent", [])
    if len(parents) != 1:
        return None
    states = request.headers.getall("tracestate", [])
    return trace_context(parents[0], ",".join(states) if states else None)


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job with id '{job_id}'")


def _conflict(job_id: str, state: str, rule: str) -> ApiError:
    return ApiError(409, "conflict", f"job '{job_id}' is {state}: {rule}")


def _queue_name(request: web.Request) -> str:
    queue = request.match_info["queue"]
    if not valid_queue(queue):
        raise ApiError(404, "not_found", f"'{queue}' is not a queue name")
    return queue


def _address(address: Any) -> str:
    """A bound address as a person would type it: http://host:port, or the socket path."""
    if isinstance(address, tuple):
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return f"http://{host}:{address[1]}"
    return str(address)
