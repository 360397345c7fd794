"""`Client`: the API from ordinary (threaded) code, over keep-alive stdlib HTTP connections."""

from __future__ import annotations

import builtins
import http.client
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from taskd.client import core
from taskd.client.address import Endpoint
from taskd.client.core import Request
from taskd.client.documents import (
    Job,
    NewJob,
    Page,
    Purged,
    QueueState,
    Retried,
    TraceContext,
)
from taskd.client.errors import DaemonError, TaskdError, TransportError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# What one exchange gives back: status, reason, body, Retry-After.
_Answer = tuple[int, str, bytes, str | None]


class Client:
    """The taskd HTTP API (docs/client.md). Safe to share between threads: each request takes
    an idle keep-alive connection, or opens one, and gives it back when answered.

    `url` is http://HOST:PORT, https://… or unix:/PATH, else $TASKD_URL, else the
    `server.listen` of the `config` file, else http://127.0.0.1:7700; `token` else
    $TASKD_TOKEN (else the config's). `timeout`: seconds to wait for each answer (None: no
    limit). `retries`: how many times a request is sent again after a connection failure
    (or a 503 with Retry-After) when that is safe; 0 never.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        config: str | None = None,
        timeout: float | None = core.TIMEOUT,
        retries: int = core.RETRIES,
    ) -> None:
        self._options = core.Options.of(
            url, token=token, config=config, timeout=timeout, retries=retries
        )
        self._idle: builtins.list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        return self._options.url

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; the client takes no more requests."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def submit(
        self,
        type: str,
        payload: Any = None,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | str | float | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        max_attempts: int | None = None,
        trace: TraceContext | None = None,
    ) -> Job:
        """Submit a job; the job as created (or, for a repeated idempotency key, the first).
        `trace`: the caller's W3C Trace Context, for a daemon with [tracing]."""
        job = core.new_job(
            type,
            payload,
            delay=delay,
            run_at=run_at,
            priority=priority,
            idempotency_key=idempotency_key,
            callback_url=callback_url,
            max_attempts=max_attempts,
            trace=trace,
        )
        return self._call(core.submit(job, key_if_none=self._options.makes_keys))

    def submit_many(self, jobs: Iterable[NewJob]) -> builtins.list[str]:
        """Submit jobs in one request, all or none; their ids in the order given."""
        return self._call(core.submit_many(jobs, key_if_none=self._options.makes_keys))

    def get(self, job_id: str) -> Job:
        return self._call(core.get(job_id))

    def wait(self, job_id: str, timeout: float | None = 60.0) -> Job:
        """The job once it is completed, failed or cancelled; WaitTimeout after `timeout` s."""
        poll = core.Poll(job_id, timeout)
        while (pause := poll.after(job := self.get(job_id))) is not None:
            time.sleep(pause)
        return job

    def cancel(self, job_id: str) -> Job:
        return self._call(core.cancel(job_id))

    def retry(self, job_id: str) -> Job:
        return self._call(core.retry(job_id))

    def delete(self, job_id: str) -> None:
        self._call(core.delete(job_id))

    def list(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        type: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of jobs, newest first; pass its `next_cursor` as `cursor` for the next."""
        request = core.list_jobs(
            state=state, queue=queue, job_type=type, limit=limit, cursor=cursor
        )
        return self._call(request)

    def iter_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        type: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[Job]:
        """Every job the filters match, newest first, a page at a time."""
        cursor = None
        while True:
            page = self.list(state=state, queue=queue, type=type, limit=page_size, cursor=cursor)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def stats(self) -> dict[str, Any]:
        return self._call(core.stats())

    def pause(self, queue: str) -> QueueState:
        return self._call(core.pause(queue))

    def resume(self, queue: str) -> QueueState:
        return self._call(core.resume(queue))

    def purge(self, queue: str, state: str) -> Purged:
        """Delete the queue's jobs in `state` ("queued", "scheduled" or "failed")."""
        return self._call(core.purge(queue, state))

    def retry_dead(self, type: str | None = None, *, queue: str | None = None) -> Retried:
        """Put the dead letters back on their queues, of this type and queue, or all."""
        return self._call(core.retry_dead(job_type=type, queue=queue))

    def _call(self, request: Request[T]) -> T:
        resends = 0
        while True:
            try:
                return core.answer(request, *self._exchange(request))
            except (TransportError, DaemonError) as error:
                wait = core.resend_after(request, error, resends, self._options.retries)
                if wait is None:
                    raise
            resends += 1
            time.sleep(wait)

    def _exchange(self, request: Request[Any]) -> _Answer:
        connection = self._take()
        try:
            answer = _exchange(connection, request, self._options)
        except BaseException:
            connection.close()
            raise
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return answer
        connection.close()
        return answer

    def _take(self) -> http.client.HTTPConnection:
        """An idle connection the daemon has not closed meanwhile, else a new one."""
        with self._lock:
            if self._closed:
                raise TaskdError("the client is closed")
            while self._idle:
                connection = self._idle.pop()
                if not _dropped(connection):
                    return connection
                connection.close()
        return _connection(self._options.endpoint, self._options.timeout)


def _exchange(
    connection: http.client.HTTPConnection, request: Request[Any], options: core.Options
) -> _Answer:
    """Send the request and read the whole answer (which frees the connection for the next)."""
    url = options.url
    try:
        if connection.sock is None:
            connection.connect()
        headers = request.headers(options.token)
        path = options.endpoint.prefix + request.path
        connection.request(request.method, path, body=request.body, headers=headers)
    except (OSError, http.client.HTTPException) as exc:
        # Not written whole, so the daemon cannot have acted on it.
        raise _failure(exc, url, options.timeout, sent=False) from exc
    try:
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise _failure(exc, url, options.timeout, sent=True) from exc
    return response.status, response.reason, body, response.getheader("Retry-After")


def _failure(exc: Exception, url: str, timeout: float | None, *, sent: bool) -> TransportError:
    if isinstance(exc, TimeoutError):
        return core.timed_out(url, timeout, sent=sent)
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    # A certificate refused, or a TLS mismatch, is refused again.
    return core.no_answer(url, reason, sent=sent, transient=not isinstance(exc, ssl.SSLError))


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether the daemon closed this idle connection (its keep-alive timeout, a restart):
    an idle connection with something to read has been closed, or is out of step. Checked
    before sending, so that a request that cannot be resent is not lost on a dead one."""
    sock = connection.sock
    if sock is None:
        return False  # closed by us: it reconnects
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _connection(where: Endpoint, timeout: float | None) -> http.client.HTTPConnection:
    if where.unix_path is not None:
        return _UnixConnection(where.unix_path, timeout)
    kind = http.client.HTTPSConnection if where.https else http.client.HTTPConnection
    return kind(where.host, where.port, timeout=timeout)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the unix socket a daemon with `listen = "unix:/path"` serves on."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
