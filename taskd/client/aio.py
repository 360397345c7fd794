"""`AsyncClient`: the API from asyncio code, over an aiohttp session's keep-alive connections."""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
from yarl import URL

from taskd.client import core
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

T = TypeVar("T")


class AsyncClient:
    """The taskd HTTP API for asyncio (docs/client.md): the methods of `Client`, awaited.

    Use it from one event loop; its aiohttp session is opened at the first request and
    closed by `await close()` or at the end of `async with`. The arguments are `Client`'s.
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
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return self._options.url

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections; the client takes no more requests."""
        self._closed = True
        if self._http is not None:
            await self._http.close()

    async def submit(
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
        return await self._call(core.submit(job, key_if_none=self._options.makes_keys))

    async def submit_many(self, jobs: Iterable[NewJob]) -> builtins.list[str]:
        """Submit jobs in one request, all or none; their ids in the order given."""
        return await self._call(core.submit_many(jobs, key_if_none=self._options.makes_keys))

    async def get(self, job_id: str) -> Job:
        return await self._call(core.get(job_id))

    # A `timeout` as Client.wait has, rather than asyncio.timeout around it: WaitTimeout
    # carries the job as last seen.
    async def wait(self, job_id: str, timeout: float | None = 60.0) -> Job:  # noqa: ASYNC109
        """The job once it is completed, failed or cancelled; WaitTimeout after `timeout` s."""
        poll = core.Poll(job_id, timeout)
        # Polling: the API has no way to tell a client when a job ends.
        while (pause := poll.after(job := await self.get(job_id))) is not None:  # noqa: ASYNC110
            await asyncio.sleep(pause)
        return job

    async def cancel(self, job_id: str) -> Job:
        return await self._call(core.cancel(job_id))

    async def retry(self, job_id: str) -> Job:
        return await self._call(core.retry(job_id))

    async def delete(self, job_id: str) -> None:
        await self._call(core.delete(job_id))

    async def list(
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
        return await self._call(request)

    async def iter_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        type: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Job]:
        """Every job the filters match, newest first, a page at a time."""
        cursor = None
        while True:
            page = await self.list(
                state=state, queue=queue, type=type, limit=page_size, cursor=cursor
            )
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def stats(self) -> dict[str, Any]:
        return await self._call(core.stats())

    async def pause(self, queue: str) -> QueueState:
        return await self._call(core.pause(queue))

    async def resume(self, queue: str) -> QueueState:
        return await self._call(core.resume(queue))

    async def purge(self, queue: str, state: str) -> Purged:
        """Delete the queue's jobs in `state` ("queued", "scheduled" or "failed")."""
        return await self._call(core.purge(queue, state))

    async def retry_dead(self, type: str | None = None, *, queue: str | None = None) -> Retried:
        """Put the dead letters back on their queues, of this type and queue, or all."""
        return await self._call(core.retry_dead(job_type=type, queue=queue))

    async def _call(self, request: Request[T]) -> T:
        resends = 0
        while True:
            try:
                return core.answer(request, *await self._exchange(request))
            except (TransportError, DaemonError) as error:
                wait = core.resend_after(request, error, resends, self._options.retries)
                if wait is None:
                    raise
            resends += 1
            await asyncio.sleep(wait)

    async def _exchange(self, request: Request[Any]) -> tuple[int, str, bytes, str | None]:
        """Send the request and read the whole answer (which frees the connection)."""
        options = self._options
        url = URL(options.endpoint.base + request.path, encoded=True)
        headers = request.headers(options.token)
        try:
            async with self._session().request(
                request.method, url, data=request.body, headers=headers
            ) as response:
                body = await response.read()
                retry_after = response.headers.get("Retry-After")
                return response.status, response.reason or "", body, retry_after
        except TimeoutError:
            raise core.timed_out(options.url, options.timeout, sent=True) from None
        except aiohttp.ClientSSLError as exc:
            # A certificate refused, or a TLS mismatch, is refused again.
            raise core.no_answer(options.url, str(exc), sent=False, transient=False) from exc
        except aiohttp.ClientConnectorError as exc:
            raise core.no_answer(options.url, _reason(exc.os_error), sent=False) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # aiohttp does not say whether the request was written: count it as sent.
            raise core.no_answer(options.url, _reason(exc), sent=True) from exc

    def _session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise TaskdError("the client is closed")
        if self._http is None:
            where = self._options.endpoint
            connector: aiohttp.BaseConnector
            if where.unix_path is not None:
                connector = aiohttp.UnixConnector(path=where.unix_path)
            else:
                connector = aiohttp.TCPConnector()
            timeout = aiohttp.ClientTimeout(total=self._options.timeout)
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._http


def _reason(exc: BaseException) -> str:
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int):
        return os.strerror(errno)
    return str(exc) or type(exc).__name__
