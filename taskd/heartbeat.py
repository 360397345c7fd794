"""The heartbeat: registers this daemon in Redis and refreshes its record while it lives."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from taskd.jobs import now_ms
from taskd.loop import Outage, repeat
from taskd.store import DaemonInfo, Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this daemon is; the id names its in-flight keys in Redis."""

    id: str
    host: str
    pid: int
    started_at: int

    @classmethod
    def create(cls, clock: Callable[[], int] = now_ms) -> Identity:
        host, pid = socket.gethostname(), os.getpid()
        # The random part keeps a restarted daemon (same host, reused pid) apart from the
        # record its dead predecessor left behind.
        return cls(
            id=f"{host}-{pid}-{secrets.token_hex(3)}", host=host, pid=pid, started_at=clock()
        )


class Heartbeat:
    """Writes this daemon's record every `interval` seconds."""

    def __init__(
        self,
        *,
        store: Store,
        identity: Identity,
        concurrency: int,
        queues: Sequence[str],
        types: Sequence[str],
        active: Callable[[], int],
        interval: float,
        on_reaped: Callable[[], Awaitable[object]],
        after_beat: Callable[[], Awaitable[object]],
        on_data_lost: Callable[[], None] = lambda: None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._identity = identity
        self._concurrency = concurrency
        self._queues = tuple(queues)
        # Registered, so that /stats can tell the job types no live daemon can run.
        self._types = tuple(sorted(types))
        self._active = active
        self._interval = interval
        self._on_reaped = on_reaped
        self._after_beat = after_beat
        self._on_data_lost = on_data_lost
        self._clock = clock
        self._registered = False
        # Held by a beat on its way to Redis and by the deregistration: a beat sent just
        # before the shutdown deregisters must not land after it and register us again.
        self._writing = anyio.Lock()
        self._deregistered = False

    async def tick(self) -> None:
        """Write the record once, with the current time and active job count.

        Finding the record gone means other daemons took this one for dead (a long pause,
        a partition) and took its jobs back: the beat registers it again, and the jobs it
        still runs but no longer owns are stopped, since they may run elsewhere already.
        Finding the installation's marker gone too means Redis lost its data.
        """
        me = self._identity
        async with self._writing:
            if self._deregistered:
                return
            beat = await self._store.beat(
                DaemonInfo(
                    id=me.id,
                    host=me.host,
                    pid=me.pid,
                    started_at=me.started_at,
                    concurrency=self._concurrency,
                    queues=self._queues,
                    active=self._active(),
                    last_heartbeat=self._clock(),
                    types=self._types,
                )
            )
        if self._registered and not beat.marked:
            # No marker, no registration: not a reaper's doing, an empty Redis.
            logger.error(
                "Redis lost its data (restarted without persistence, or failed over to an"
                " empty replica): every job stored before is gone, queued, running and"
                " finished alike; jobs this daemon still runs are stopped"
            )
            self._on_data_lost()
        if self._registered and not beat.registered:
            logger.warning("this daemon was taken for dead; registered again")
            await self._on_reaped()
        self._registered = True
        await self._after_beat()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Register (failing loudly if Redis is unreachable at start), then beat until cancelled."""
        await self.tick()
        task_status.started()
        # The step waits first, so a failed beat is tried again one interval later.
        await repeat(self._wait_then_beat, outage=Outage("the heartbeat", logger), retry_delay=0)

    async def _wait_then_beat(self) -> None:
        await anyio.sleep(self._interval)
        await self.tick()

    async def deregister(self) -> None:
        """Remove this daemon's record (at a clean shutdown), after any beat on its way;
        the beats after it write nothing."""
        async with self._writing:
            self._deregistered = True
            await self._store.deregister_daemon(self._identity.id, self._queues)
