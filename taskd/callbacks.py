"""The callback sender: POSTs a finished job's final record to the job's callback_url."""

from __future__ import annotations

import logging
import math

import aiohttp
import anyio
import orjson

from taskd.jobs import Job
from taskd.store import Store

logger = logging.getLogger(__name__)

# Deliveries waiting to be sent; past this, new ones are dropped (and counted) rather
# than letting a dead endpoint grow the daemon's memory without bound.
MAX_PENDING = 10_000
SENDERS = 8
ATTEMPTS = 4
REQUEST_TIMEOUT = 10.0


class Callbacks:
    """Sends callbacks from a few tasks of its own, with retries, never blocking workers.

    A callback reports an outcome; it never changes it. One that keeps failing is logged
    and counted in the queue's totals (`callbacks_failed`); one that arrives is counted as
    `callbacks_sent`. Deliveries live in this daemon's memory: those not yet sent when it
    stops (or dies) are not sent.
    """

    def __init__(self, *, store: Store, backoff_base: float = 0.5) -> None:
        self._store = store
        self._backoff_base = backoff_base
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, str]](MAX_PENDING)
        self.queued = 0  # callbacks this daemon took on since it started

    async def job_ended(self, job: Job) -> None:
        """Queue the callback of a job that reached a final state, if it asked for one."""
        if job.callback_url is None:
            return
        self.queued += 1
        try:
            self._send.send_nowait((job.queue, job.id))
        except anyio.ClosedResourceError:
            logger.warning("callback of job %s not sent: the daemon is stopping", job.id)
        except anyio.WouldBlock:
            logger.warning("callback of job %s dropped: %d already waiting", job.id, MAX_PENDING)
            await self._count(job.queue, "callbacks_failed")

    async def run(self) -> None:
        """Send callbacks until cancelled."""
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        with self._send, self._receive:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                anyio.create_task_group() as tg,
            ):
                for _ in range(SENDERS):
                    tg.start_soon(self._sender, session)

    async def _sender(self, session: aiohttp.ClientSession) -> None:
        with self._receive.clone() as deliveries:
            async for queue, job_id in deliveries:
                await self.tick(session, queue, job_id)

    async def tick(self, session: aiohttp.ClientSession, queue: str, job_id: str) -> bool:
        """Deliver one callback, retrying with backoff; True if the endpoint took it."""
        for attempt in range(1, ATTEMPTS + 1):
            job = await self._store.get_job(job_id, [queue])
            if job is None or job.callback_url is None:
                return False  # deleted meanwhile: nothing left to report
            error = await _post(session, job)
            if error is None:
                await self._count(queue, "callbacks_sent")
                return True
            if attempt < ATTEMPTS:
                await anyio.sleep(self._backoff_base * math.pow(2, attempt - 1))
        logger.warning("callback of job %s failed for good: %s", job_id, error)
        await self._count(queue, "callbacks_failed")
        return False

    async def _count(self, queue: str, name: str) -> None:
        # Counting must not fail a delivery: a lost count is only a statistic.
        try:
            await self._store.count(queue, name)
        except Exception:
            logger.debug("could not count %s", name, exc_info=True)


async def _post(session: aiohttp.ClientSession, job: Job) -> str | None:
    """POST the job's record; None on a 2xx answer, else what went wrong."""
    assert job.callback_url is not None
    body = orjson.dumps(job.to_public())
    headers = {"Content-Type": "application/json", "X-Taskd-Job-Id": job.id}
    try:
        async with session.post(job.callback_url, data=body, headers=headers) as response:
            if 200 <= response.status < 300:
                return None
            return f"HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return repr(exc)
