"""The canceller listens for cancel requests and cancels the jobs this daemon runs."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from taskd.loop import Outage, repeat
from taskd.store import Store

logger = logging.getLogger(__name__)

RETRY_DELAY = 0.5


class Canceller:
    """Subscribes to cancel requests; each names a job some daemon runs, maybe this one."""

    def __init__(self, *, store: Store, cancel_local: Callable[[str], bool]) -> None:
        self._store = store
        self._cancel_local = cancel_local

    def on_request(self, job_id: str) -> bool:
        """Handle one request; True if the job ran here and is being cancelled."""
        cancelled = self._cancel_local(job_id)
        if cancelled:
            logger.info("job %s cancelled while running", job_id)
        return cancelled

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled (started once subscribed), subscribing again after errors."""
        # A subscription works from the moment it is made, not when its pass ends.
        outage = Outage("listening for cancel requests", logger)
        started = False

        async def listen() -> None:
            nonlocal started
            async with self._store.cancel_requests() as requests:
                if not started:
                    task_status.started()
                    started = True
                outage.ok()
                async for job_id in requests:
                    self.on_request(job_id)
            await anyio.sleep(RETRY_DELAY)  # the server closed it: subscribe again soon

        await repeat(listen, outage=outage, retry_delay=RETRY_DELAY)
