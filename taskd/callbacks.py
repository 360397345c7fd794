"""The callback sender: POSTs final job records to their callback_url, from Redis's outbox."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
import anyio
import orjson
from anyio.abc import TaskGroup
from yarl import URL

from taskd.egress import DEFAULT_POLICY, Policy, Refused, connector
from taskd.jobs import Job, now_ms
from taskd.loop import Outage, repeat
from taskd.signing import UNSIGNED, Signer, callback_id
from taskd.store import Store

if TYPE_CHECKING:  # opentelemetry, which it imports, is the optional otel extra
    from taskd.tracing import Tracing

logger = logging.getLogger(__name__)

# Callbacks one daemon sends at once: each may wait for a slow endpoint and its retries,
# so there are many, but few enough that a dead endpoint costs little memory.
SENDERS = 32
ATTEMPTS = 4
REQUEST_TIMEOUT = 10.0
# How often an idle sender looks at its queues' outboxes: callbacks of jobs that other
# daemons (or reapers) ended are seen within this. Jobs this daemon ends wake it at once.
POLL_INTERVAL = 1.0
# Longest the return of unsent callbacks may take when the daemon stops.
RETURN_TIMEOUT = 5.0


class Callbacks:
    """Sends callbacks from tasks of its own, with retries, never blocking workers.

    The script that ends a job with a callback_url puts its id in the queue's outbox in
    the same step, so no crash loses a callback. A daemon takes callbacks of the queues
    it serves into its own set in flight (a reaper returns them to the outbox should the
    daemon die), sends each, and records it `callbacks_sent` or, after ATTEMPTS tries,
    `callbacks_failed` in the queue's totals; a callback reports an outcome and never
    changes it. A callback is sent at least once: twice only if its daemon died between
    sending it and recording it. Callbacks not sent when the daemon stops go back to the
    outbox for any daemon to send.

    `egress` is where callbacks may go (by default, public addresses only); they follow
    no redirect, which would lead them past it. `signer` signs each delivery (by default
    none): every delivery of a callback, by any daemon, is one message (callback_id).
    With `tracing`, each request is a span in the job's trace, and says so (traceparent).
    """

    def __init__(
        self,
        *,
        store: Store,
        daemon_id: str,
        queues: Sequence[str],
        clock: Callable[[], int] = now_ms,
        backoff_base: float = 0.5,
        senders: int = SENDERS,
        poll_interval: float = POLL_INTERVAL,
        egress: Policy = DEFAULT_POLICY,
        signer: Signer = UNSIGNED,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing  # None: off
        self._store = store
        self._egress = egress
        self._signer = signer
        self._daemon_id = daemon_id
        self._queues = tuple(queues)
        self._clock = clock
        self._backoff_base = backoff_base
        self._free = senders
        self._poll_interval = poll_interval
        self._wake = anyio.Event()
        self._sending: set[tuple[str, str]] = set()
        self._scope = anyio.CancelScope()
        self._stopped = anyio.Event()
        self.queued = 0  # callbacks this daemon took from the outboxes since it started

    def job_ended(self, job: Job) -> None:
        """A job this daemon ended reached its final state: look at the outbox now."""
        if job.callback_url is not None:
            self._wake.set()

    async def tick(self, session: aiohttp.ClientSession, tg: TaskGroup) -> int:
        """One pass: take as many callbacks as there are free senders, and start them."""
        taken = 0
        for queue in self._queues:
            if self._free == 0:
                break
            ids = await self._store.take_callbacks(
                queue, self._daemon_id, self._free, self._clock()
            )
            for job_id in ids:
                self._free -= 1
                self._sending.add((queue, job_id))
                tg.start_soon(self._deliver, session, queue, job_id)
            taken += len(ids)
        self.queued += taken
        return taken

    async def run(self) -> None:
        """Send callbacks until stop() (or cancellation), then return the unsent ones."""
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        try:
            with self._scope:
                async with (
                    aiohttp.ClientSession(
                        timeout=timeout, connector=connector(self._egress)
                    ) as session,
                    anyio.create_task_group() as tg,
                ):
                    await self._loop(session, tg)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(RETURN_TIMEOUT):
                await self._return_unsent()
            self._stopped.set()

    async def stop(self) -> None:
        """Stop sending and return what was not sent to the outboxes."""
        self._scope.cancel()
        await self._stopped.wait()

    async def _loop(self, session: aiohttp.ClientSession, tg: TaskGroup) -> None:
        async def take_then_wait() -> None:
            self._wake = anyio.Event()
            taken = await self.tick(session, tg)
            if taken == 0 or self._free == 0:
                with anyio.move_on_after(self._poll_interval):
                    await self._wake.wait()

        outage = Outage("taking callbacks", logger)
        await repeat(take_then_wait, outage=outage, retry_delay=self._poll_interval)

    async def _deliver(self, session: aiohttp.ClientSession, queue: str, job_id: str) -> None:
        try:
            outcome = await self.send(session, queue, job_id)
            if not await self._store.callback_done(queue, self._daemon_id, job_id, outcome):
                logger.warning("callback of job %s was taken back from this daemon", job_id)
            self._sending.discard((queue, job_id))
        except Exception:
            # Still in this daemon's set in flight: returned to the outbox when it stops.
            logger.warning("recording the callback of job %s failed", job_id, exc_info=True)
        finally:
            self._free += 1
            self._wake.set()

    async def send(self, session: aiohttp.ClientSession, queue: str, job_id: str) -> str:
        """Deliver one callback, retrying with backoff: 'sent', 'failed' or 'dropped'
        (the job is gone: deleted or past its retention)."""
        for attempt in range(1, ATTEMPTS + 1):
            job = await self._store.get_job(job_id, [queue])
            if job is None or job.callback_url is None:
                return "dropped"
            try:
                error = await _post(session, job, self._egress, self._signer, self._tracing)
            except Refused as exc:
                # The same policy would refuse every retry.
                logger.warning("callback of job %s failed for good: %s", job_id, exc)
                return "failed"
            if error is None:
                return "sent"
            if attempt < ATTEMPTS:
                await anyio.sleep(self._backoff_base * math.pow(2, attempt - 1))
        logger.warning("callback of job %s failed for good: %s", job_id, error)
        return "failed"

    async def release_orphans(self, grace_ms: int) -> int:
        """Return to the outbox callbacks this daemon's sets in flight hold but it does not
        send: a take whose reply was lost (see WorkerPool.release_orphans)."""
        before = self._clock() - grace_ms
        released = 0
        for queue in self._queues:
            for job_id in await self._store.sending_before(queue, self._daemon_id, before):
                if (queue, job_id) not in self._sending:
                    await self._store.callback_done(queue, self._daemon_id, job_id, "returned")
                    released += 1
        return released

    async def _return_unsent(self) -> None:
        returned = 0
        for queue, job_id in list(self._sending):
            try:
                await self._store.callback_done(queue, self._daemon_id, job_id, "returned")
                returned += 1
            except Exception:
                logger.warning("could not return callback of job %s", job_id, exc_info=True)
        if returned:
            logger.info("returned %d unsent callbacks to their outbox", returned)


async def _post(
    session: aiohttp.ClientSession,
    job: Job,
    egress: Policy,
    signer: Signer,
    tracing: Tracing | None,
) -> str | None:
    """POST the job's record, signed; None on a 2xx answer, else what went wrong. Raise
    Refused if the policy refuses the destination (names are checked by the session's
    resolver)."""
    assert job.callback_url is not None
    # Submission refused these already; a job submitted under another policy may not be.
    egress.check_url(job.callback_url)
    body = orjson.dumps(job.to_public())
    headers = {"Content-Type": "application/json", "X-Taskd-Job-Id": job.id}
    headers |= signer.headers(callback_id(job), body)
    if tracing is None:
        return await _send(session, job.callback_url, body, headers)
    with tracing.callback(job, URL(job.callback_url).host or "") as span:
        # Not signed, nor need they be: a signature covers the body (signing.py).
        span.error = await _send(session, job.callback_url, body, headers | span.headers)
        return span.error


async def _send(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> str | None:
    """One POST of a callback: None on a 2xx answer, else what went wrong."""
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            if 200 <= response.status < 300:
                return None
            if 300 <= response.status < 400:
                return f"HTTP {response.status}: callbacks follow no redirect"
            return f"HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return repr(exc)
