"""The daemon: builds the cooperating tasks, runs them in one task group, stops them in order.

The tasks share their work through Redis. Their links in this process are callbacks
passed below, invisible in the import graph. Most are wake-up hints that make a task act
sooner than its next poll, never more correct:
- workers -> promoter (`on_retry`), the HTTP API -> promoter (`on_scheduled`): a job falls due
  earlier than the promoter planned to look.
- workers, the HTTP API -> callbacks, the archiver process (`on_final`): a job ended, with
  a callback to send or an archive entry to write.
- heartbeat -> workers (`on_reaped`): a reaper took this daemon's jobs back; stop them.
- canceller -> workers (`cancel_local`): cancel a job if it runs here.
- workers -> heartbeat, the HTTP API (`active`): how many jobs run now, for /stats.
- heartbeat -> metrics (`on_data_lost`): Redis lost its data.
One is a duty: after each beat (`after_beat`) the workers and callbacks release what
their in-flight sets hold but nothing here runs (a claim whose reply was lost).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from taskd import logs
from taskd.api import HttpApi
from taskd.callbacks import Callbacks
from taskd.canceller import Canceller
from taskd.config import Config, redact, redact_postgres
from taskd.connections import warn_if_few_files
from taskd.egress import Policy
from taskd.handlers import Handlers
from taskd.heartbeat import Heartbeat, Identity
from taskd.janitor import Janitor
from taskd.jobs import Job
from taskd.metrics import Metrics
from taskd.promoter import Promoter
from taskd.reaper import Reaper
from taskd.scheduler import Scheduler
from taskd.signing import Signer
from taskd.store import UNAVAILABLE, Inspector, Store
from taskd.systemd import Notifier
from taskd.workers import BLOCK_TIMEOUT, WorkerPool

if TYPE_CHECKING:
    from taskd.archive import Archive
    from taskd.archive.process import ArchiverProcess
    from taskd.tracing import Tracing

logger = logging.getLogger(__name__)

# How long start-up waits for Redis to answer before giving up (systemd restarts us).
STARTUP_REDIS_TIMEOUT = 15.0
# Age after which a job in this daemon's active set that it does not run is an orphan: a
# claim's reply takes milliseconds, so a second is ample even on a loaded machine.
ORPHAN_GRACE_MS = 1000


class Daemon:
    """One taskd process: the HTTP API and the cooperating tasks, sharing one store."""

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        handlers: Handlers,
        notifier: Notifier | None = None,
        archive: Archive | None = None,
        tracing: Tracing | None = None,
        redis_url: str | None = None,
    ) -> None:
        """`archive`: the archive's database, for the API's reads (None: no [archive]);
        `redis_url`: where `store` connects, for the archiver process (default: the
        config's)."""
        self.config = config
        # Spans of submissions and attempts (None: off); `handlers` got the same from
        # whoever built them.
        self._tracing = tracing
        # systemd's readiness and watchdog; inert unless systemd started us (Type=notify).
        self.notifier = Notifier() if notifier is None else notifier
        self.identity = Identity.create()
        workers = config.workers
        # Queues this daemon knows of: it serves some, and takes jobs for its handlers'.
        self.scheduler = Scheduler(
            store=store,
            schedules=config.schedules,
            handler_configs=config.handlers,
            tracing=tracing,
        )
        known = frozenset(workers.queues) | {h.queue for h in config.handlers.values()}
        known |= {self.scheduler.queue_of(s) for s in config.schedules}
        self.queues = known
        self.metrics = Metrics(
            concurrency=workers.concurrency,
            job_types=[(h.queue, h.name) for h in config.handlers.values()],
        )
        self.promoter = Promoter(store=store, queues=sorted(known))
        # Where callbacks may go, and how they are signed; `handlers` got the same policy
        # and signer from whoever built them.
        egress = Policy.from_config(config.callbacks)
        self.callbacks = Callbacks(
            store=store,
            daemon_id=self.identity.id,
            queues=workers.queues,
            egress=egress,
            signer=Signer.from_config(config.server),
            tracing=tracing,
        )
        self.archiver = (
            None if archive is None else _archiver_process(config, redis_url, self.identity, known)
        )
        self.pool = WorkerPool(
            store=store,
            handlers=handlers,
            handler_configs=config.handlers,
            daemon_id=self.identity.id,
            queues=workers.queues,
            concurrency=workers.concurrency,
            queue_mode=workers.queue_mode,
            weights=dict(workers.weights),
            metrics=self.metrics,
            on_retry=self.promoter.wake,
            on_final=self._job_ended,
            tracing=tracing,
        )
        self.heartbeat = Heartbeat(
            store=store,
            identity=self.identity,
            concurrency=workers.concurrency,
            queues=workers.queues,
            types=list(config.handlers),
            active=lambda: self.pool.active,
            interval=workers.heartbeat_interval,
            on_reaped=self.pool.drop_lost,
            after_beat=self._release_orphans,
            on_data_lost=self.metrics.redis_data_lost,
        )
        self.reaper = Reaper(
            store=store,
            daemon_id=self.identity.id,
            queues=known,
            interval=workers.heartbeat_interval,
            dead_after=workers.dead_after,
            metrics=self.metrics,
        )
        self.janitor = Janitor(
            store=store,
            queues=known,
            retention=config.retention,
            unlimited=[h.name for h in config.handlers.values() if not h.global_concurrency],
        )
        self.canceller = Canceller(store=store, cancel_local=self.pool.cancel_local)
        inspector = Inspector(connection=store.connection)
        self.api = HttpApi(
            store=store,
            inspector=inspector,
            server=config.server,
            handler_configs=config.handlers,
            queues=known,
            dead_after=workers.dead_after,
            metrics=self.metrics,
            active=lambda: self.pool.active,
            on_scheduled=self.promoter.wake,
            on_final=self._job_ended,
            schedules=partial(self.scheduler.describe, inspector),
            request_timeout=config.redis.request_timeout,
            egress=egress,
            archive=archive,
            autoscale=config.autoscale,
            tracing=tracing,
        )
        self._store = store
        self._stopping = anyio.Event()

    def _job_ended(self, job: Job) -> None:
        self.callbacks.job_ended(job)
        if self.archiver is not None:
            self.archiver.job_ended()

    def stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM does)."""
        self._stopping.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every task, serve until stopped, then shut down in order."""
        # Other daemons (their /stats, reapers, janitors) learn of the queues we fill.
        await self._store.add_queues(self.queues)
        async with anyio.create_task_group() as tg:
            # First in, cancelled last: it pings through start-up and the whole drain.
            tg.start_soon(self.notifier.run_watchdog)
            await tg.start(self._watch_signals)
            await tg.start(self.heartbeat.run)
            await tg.start(self.canceller.run)
            tg.start_soon(self.promoter.run)
            tg.start_soon(self.reaper.run)
            tg.start_soon(self.janitor.run)
            tg.start_soon(self.callbacks.run)
            if self.archiver is not None:
                tg.start_soon(self.archiver.run)
            if self.config.schedules:
                tg.start_soon(self.scheduler.run)
            await tg.start(self.pool.run)
            warn_if_few_files(self.config.server.max_connections, self.config.workers.concurrency)
            await tg.start(self.api.run)
            logger.info(
                "taskd %s ready: concurrency %d, queues %s",
                self.identity.id,
                self.config.workers.concurrency,
                ", ".join(self.config.workers.queues),
            )
            self.notifier.ready(
                f"serving: concurrency {self.config.workers.concurrency}, "
                f"queues {', '.join(self.config.workers.queues)}"
            )
            task_status.started()
            await self._stopping.wait()
            await self._shutdown()
            tg.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        """The shutdown order; each step assumes the ones before it are done."""
        grace = self.config.workers.shutdown_timeout
        logger.info("shutting down: draining for up to %g s", grace)
        self.notifier.stopping(f"draining for up to {grace:g} s")
        # 1. Stop intake: the API answers new submissions 503, so clients turn to another daemon.
        self.api.refuse_new()
        # 2-4. Stop fetching, let running jobs finish until the deadline, cancel the rest
        # and return every unfinished job to its queue.
        await self.pool.drain(grace)
        # 5. Stop sending callbacks, returning the unsent ones to their outbox for any
        # daemon to send (before deregistering: a reaper would not look for them after).
        await self.callbacks.stop()
        # 6. Stop the archiver process: it gives up the queues it archives, for another
        # daemon's to take over at once. What it had not written yet, what it was writing
        # included, stays in the hand-off for whichever archiver takes the queue next
        # (written twice, harmlessly).
        if self.archiver is not None:
            await self.archiver.stop()
        # 7. Send the spans still batched (the last attempts', the callbacks'), for a few
        # seconds at most: a collector that does not answer does not hold the exit.
        # Before deregistering: the heartbeat still runs, and would register us again.
        if self._tracing is not None:
            await self._tracing.flush()
        # 8. Deregister: nothing of this daemon is left in Redis for a reaper to find.
        try:
            await self.heartbeat.deregister()
        except UNAVAILABLE:
            logger.warning("could not deregister: Redis unreachable")
        logger.info("taskd %s stopped", self.identity.id)

    async def _release_orphans(self) -> None:
        # Claims answered within this grace are never taken for orphans.
        await self.pool.release_orphans(ORPHAN_GRACE_MS)
        await self.callbacks.release_orphans(ORPHAN_GRACE_MS)

    async def _watch_signals(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The one place signals are handled: the first stops gracefully, a second hurries."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping.is_set():
                    logger.info(
                        "%s received: stopping gracefully (send again to cancel jobs)", name
                    )
                    self._stopping.set()
                else:
                    logger.warning("%s received again: cancelling running jobs now", name)
                    self.pool.hurry()


async def wait_for_redis(store: Store, url: str, patience: float = STARTUP_REDIS_TIMEOUT) -> None:
    """Return once Redis answers; raise the last error after `patience` seconds."""
    with anyio.move_on_after(patience):
        while True:
            try:
                await store.ping()
                return
            except UNAVAILABLE as exc:
                logger.warning("Redis at %s does not answer yet: %s", redact(url), exc)
                await anyio.sleep(0.5)
    await store.ping()


def connect(config: Config, redis_url: str) -> Store:
    """The store a daemon with this config uses."""
    return Store.from_url(
        redis_url,
        prefix=config.redis.prefix,
        # One blocking fetch per queue, and the cancel-request subscription.
        blocking_connections=len(config.workers.queues) + 1,
        block_timeout=BLOCK_TIMEOUT,
        cluster=config.redis.cluster,
        archive=config.archive.url is not None,
    )


async def serve(config: Config, redis_url: str) -> None:
    """Run one daemon against the Redis at `redis_url` until a stop signal."""
    store = connect(config, redis_url)
    try:
        await wait_for_redis(store, redis_url)
        egress = Policy.from_config(config.callbacks)
        signer = Signer.from_config(config.server)
        async with (
            open_tracing(config) as tracing,
            Handlers(config.handlers, egress=egress, signer=signer, tracing=tracing) as handlers,
            open_archive(config) as archive,
        ):
            daemon = Daemon(
                config=config,
                store=store,
                handlers=handlers,
                archive=archive,
                tracing=tracing,
                redis_url=redis_url,
            )
            await daemon.run()
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


def _archiver_process(
    config: Config, redis_url: str | None, identity: Identity, queues: frozenset[str]
) -> ArchiverProcess:
    # Here, not at the top: it imports psycopg, the optional archive extra.
    from taskd.archive.process import ArchiverProcess, Spec

    assert config.archive.url is not None
    level, fmt = logs.current()
    spec = Spec(
        redis_url=redis_url or config.redis.url,
        prefix=config.redis.prefix,
        cluster=config.redis.cluster,
        archive_url=config.archive.url,
        keep_days=config.archive.keep_days,
        daemon_id=f"{identity.id}-archiver",
        queues=sorted(queues),
        log_level=level,
        log_format=fmt,
    )
    return ArchiverProcess(spec=spec)


@asynccontextmanager
async def open_archive(config: Config) -> AsyncIterator[Archive | None]:
    """The archive database, when [archive] names one: connecting in the background, so
    that the daemon starts (and runs jobs) while PostgreSQL is down."""
    if config.archive.url is None:
        yield None
        return
    # Here, not at the top: psycopg is the optional archive extra.
    from taskd.archive import Archive

    archive = Archive(url=config.archive.url, keep_days=config.archive.keep_days)
    await archive.open()
    logger.info("archiving finished jobs to %s", redact_postgres(config.archive.url))
    try:
        yield archive
    finally:
        with anyio.CancelScope(shield=True):
            await archive.close()


@asynccontextmanager
async def open_tracing(config: Config) -> AsyncIterator[Tracing | None]:
    """Tracing as [tracing] configures it, or None when it is off; shut down on exit."""
    if not config.tracing.on:
        yield None
        return
    # Here, not at the top: with tracing off, not one module of OpenTelemetry is imported.
    from taskd.tracing import Tracing

    tracing = Tracing.start(config.tracing)
    logger.info("tracing: spans go to %s", redact(config.tracing.traces_url or ""))
    try:
        yield tracing
    finally:
        with anyio.CancelScope(shield=True):
            await tracing.close()
