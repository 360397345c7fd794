"""The archiver writes finished jobs from Redis's archive hand-off to the archive database."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import anyio

from taskd.archive import Archive, unreachable
from taskd.jobs import now_ms
from taskd.loop import Outage, repeat
from taskd.store import UNAVAILABLE, Archived, ArchiveRecord, Store

logger = logging.getLogger(__name__)

# Entries taken, written and removed per round trip: large enough that the per-call costs
# (a script call, a statement, a commit) are small per job, small enough that one script
# call and one statement stay short.
BATCH = 1000
# Most batches of one queue a pass writes before it turns to the next queue: a queue with
# a long backlog (after an outage) must not keep the others' jobs waiting until it is
# empty. The pass after follows at once.
ROUNDS = 50
# How long a daemon's hold on a queue's archiving lasts unless renewed by its next take:
# past it, another daemon takes over (this one died or stalled). Longer than a batch's
# write may take, so that two daemons rarely write the same entries (harmless if they do).
LEASE_MS = 10_000
# How often an idle archiver looks at the hand-offs: jobs that other daemons end are
# archived within this; those its daemon ends wake it at once (wake()).
POLL_INTERVAL = 1.0
RETRY_DELAY = 1.0
# How often the partitions past keep_days are looked for.
EXPIRE_INTERVAL_MS = 3_600_000


class Archiver:
    """Archives the final jobs of every queue, one daemon per queue at a time.

    The scripts that end a job put its id in the queue's hand-off in the same step, when
    the daemon ending it archives (lua/lib.lua, finish_job); a job that leaves its final
    state before it is archived leaves a copy there. The archiver takes the oldest entries
    with their records, writes them in one statement (a row per job and final attempt, so
    an entry written twice is harmless), reading the next batch meanwhile, and only then
    removes them from the hand-off: a crash of the daemon, of Redis or of PostgreSQL loses
    none, and the janitor keeps every job still in a hand-off. While PostgreSQL is down,
    jobs run as ever and the hand-offs grow (/stats, `archive`); the backlog drains once
    it is back.
    """

    def __init__(
        self,
        *,
        store: Store,
        archive: Archive,
        daemon_id: str,
        queues: Collection[str],
        clock: Callable[[], int] = now_ms,
        batch: int = BATCH,
        lease_ms: int = LEASE_MS,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._store = store
        self._archive = archive
        self._daemon_id = daemon_id
        self._queues = frozenset(queues)
        self._clock = clock
        self._batch = batch
        self._lease_ms = lease_ms
        self._poll_interval = poll_interval
        self._wake = anyio.Event()
        self._held: set[str] = set()  # queues whose archiving this daemon holds
        self._migrated = False
        self._expired_at = 0  # when partitions past keep_days were last dropped
        self.written = 0  # jobs this daemon wrote to the archive since it started

    def wake(self) -> None:
        """Jobs wait in a hand-off (the daemon ended some): archive them now, not at the
        next poll."""
        self._wake.set()

    async def tick(self) -> int:
        """One pass: the schema up to date, then every queue's hand-off written until
        empty; returns how many jobs were written."""
        if not self._migrated:
            await self._archive.migrate()
            self._migrated = True
        written = 0
        failed: list[Exception] = []
        # Every queue any daemon knows of, not only ours: no queue's jobs wait for a daemon
        # that serves it.
        for queue in sorted(self._queues | await self._store.known_queues()):
            try:
                written += await self._archive_queue(queue)
            except Exception as exc:
                if _down(exc):
                    raise  # every queue would fail alike: the pass ends here
                # A batch PostgreSQL refuses must not stop the other queues' archiving;
                # the loop reports the errors and tries their queues again.
                exc.add_note(f"while archiving queue {queue}")
                failed.append(exc)
        try:
            await self._expire()
        except Exception as exc:
            failed.append(exc)
        if len(failed) > 1:
            raise ExceptionGroup(f"archiving failed {len(failed)} ways", failed)
        if failed:
            raise failed[0]
        return written

    async def _archive_queue(self, queue: str) -> int:
        written = 0
        taken = await self._take(queue, skip=0)
        for rounds in range(1, ROUNDS + 1):
            if not taken:
                break
            records = [each.record for each in taken if each.record is not None]
            # The next batch is read meanwhile only if there may be one, and this pass
            # is to write it.
            ahead = len(taken) == self._batch and rounds < ROUNDS
            following = await self._write_and_take(queue, records, skip=len(taken) if ahead else 0)
            removed = await self._store.archive_done(queue, self._daemon_id, taken)
            # An entry whose job was gone or not final when read, and is still there: a
            # stray (a job that moved on meanwhile moved its entry first, see
            # archive_lease.lua).
            if removed > len(records):
                logger.warning(
                    "%d entries of queue %s's archive hand-off named no final job; dropped",
                    removed - len(records),
                    queue,
                )
            written += len(records)
            self.written += len(records)
            taken = following
        return written

    async def _write_and_take(
        self, queue: str, records: list[ArchiveRecord], *, skip: int
    ) -> list[Archived]:
        """Write `records` and, while PostgreSQL does, take the entries after the first
        `skip` (none if `skip` is 0). Taken one after the other, the two took turns on the
        machine's cores, and the archive fell behind a drain of no-op jobs by some 5,000 a
        second, its backlog growing with the drain (2026-12-08).

        An entry read twice, should the hand-off's order shift between the two reads, is
        written twice, harmlessly; one not read yet stays for the next pass."""
        following: list[Archived] = []

        async def take() -> None:
            nonlocal following
            following = await self._take(queue, skip=skip)

        try:
            async with anyio.create_task_group() as tg:
                if skip:
                    tg.start_soon(take)
                await self._archive.write(records)
        except BaseExceptionGroup as group:
            # One error, as the loop's policy reports (see loop.Outage); a cancellation
            # among them goes on as it came.
            errors = _leaves(group)
            if all(isinstance(error, Exception) for error in errors):
                raise errors[0] from None
            raise
        return following

    async def _take(self, queue: str, *, skip: int) -> list[Archived]:
        """A batch of the queue's hand-off, after the first `skip`; none if another daemon
        archives the queue."""
        taken = await self._store.take_archive(
            queue, self._daemon_id, self._batch, self._lease_ms, skip=skip
        )
        if taken is None:
            self._held.discard(queue)
            return []
        self._held.add(queue)
        return taken

    async def _expire(self) -> None:
        now = self._clock()
        if now - self._expired_at < EXPIRE_INTERVAL_MS:
            return
        dropped = await self._archive.drop_expired(now)
        self._expired_at = now
        if dropped:
            logger.info("dropped archive partitions past keep_days: %s", ", ".join(dropped))

    async def run(self) -> None:
        """Archive until cancelled."""
        outage = Outage("archiving finished jobs", logger)
        await repeat(self._archive_then_wait, outage=outage, retry_delay=RETRY_DELAY)

    async def _archive_then_wait(self) -> None:
        # A new event before the pass: a wake() during it is not lost.
        self._wake = anyio.Event()
        if await self.tick():
            return  # more may have ended meanwhile: look again at once
        with anyio.move_on_after(self._poll_interval):
            await self._wake.wait()

    async def stop(self) -> None:
        """Give up this daemon's hold on the queues it archives, so that another daemon
        takes over at once rather than after the lease."""
        for queue in sorted(self._held):
            try:
                await self._store.archive_done(queue, self._daemon_id, (), release=True)
            except UNAVAILABLE:
                logger.warning("could not release the archiving of queue %s", queue)
        self._held.clear()


def _down(error: Exception) -> bool:
    """Whether Redis or PostgreSQL is down or not answering: then every queue's write would
    fail alike. Any other error is of one queue's batch."""
    return isinstance(error, UNAVAILABLE) or unreachable(error)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in a group, nested groups opened."""
    found: list[BaseException] = []
    for error in group.exceptions:
        found += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return found
