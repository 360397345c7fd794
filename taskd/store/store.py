"""The write path: what the tasks and intake's writes do to Redis, one method an operation."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import redis.exceptions
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.utils import HIREDIS_AVAILABLE

from taskd.jobs import Job
from taskd.store import connect, record, scripts
from taskd.store.connect import Connection, text
from taskd.store.inspect import Inspector
from taskd.store.record import ArchiveRecord, Attempt, DaemonInfo, TypeLimits

if HIREDIS_AVAILABLE:  # a dependency (redis[hiredis]); redis-py packs without it
    import hiredis

logger = logging.getLogger(__name__)

# Ids moved per script call by requeue, recover, promote and trim: bounds how long one
# script blocks Redis.
BATCH = 500
# Most jobs kept for the archive that one trim looks past to the jobs after them: past
# retention and still waiting, they are many only when the archive has been down for
# longer than retention, and then the jobs after them wait too.
TRIM_KEPT_MOST = 10_000
# How long an idempotency key holds by default, ms ([server] idempotency_ttl).
DEDUP_TTL_MS = 86_400_000
# Jobs sent per script call by enqueue and enqueue_many: bounds how long one call blocks
# Redis.
ENQUEUE_CHUNK = 1000
# Enqueue calls of one queue on the wire at once (see Store.enqueue); a second one goes
# once the first has been out this long, with at least this many jobs (and half as many
# as the first carries).
ENQUEUE_LANES = 2
ENQUEUE_LANE_AFTER_S = 0.001
ENQUEUE_LANE_MIN = 16
# Payload bytes gathered into one enqueue call at most (a job over it goes alone): 1,000
# submissions of up to [server] max_body each must not make one command of a gigabyte.
ENQUEUE_BYTES = 4 * 1024 * 1024
# The bytes of the records the archiver takes at once, near enough: 1,000 jobs with
# payloads and results of a MiB each must not make one answer of 2 GiB, nor an archiver
# process that holds it and the next. It reads a batch in chunks that would fit the bytes
# left were each record as large as the largest of the queue's last take: of small jobs,
# a batch in one round trip (a chunk a round trip cost the archive an eighth of its rate,
# 2026-12-08); of a queue's first take, chunks of ARCHIVE_CHUNK. Only a queue whose jobs
# grow at once from small to large passes it, by one chunk, once: its next take is sized
# by them.
ARCHIVE_BYTES = 16 * 1024 * 1024
ARCHIVE_CHUNK = 100
# Recent wait and run times kept per queue, for the percentiles /stats shows.
TIMING_SAMPLES = 1000
# Throughput buckets are kept this long (ms), then the janitor forgets them.
THROUGHPUT_KEEP_MS = 600_000


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim gave: the jobs to run, and what the fetcher should do next."""

    jobs: list[Job]
    paused: bool = False
    more: bool = False  # ready jobs are left that the claim did not look at: claim again
    due: int | None = None  # when the first job put back for its rate limit is due
    rate_limited: int = 0  # jobs it put back for their rate_limit
    held: int = 0  # jobs it held for their global_concurrency
    # Ready jobs it left where they were: no handler here, or no free slot of the handler's
    # concurrency. Claiming again at once would find them again.
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """A claim's arguments but the queue and daemon (see Store.claim)."""

    most: int
    now: int
    type_limits: Sequence[TypeLimits]
    free: Mapping[str, int]


def _claimed(reply: Any, queue: str, daemon_id: str) -> Claimed:
    """What claim.lua answered."""
    status, due, rate_limited, held, skipped, *flat = reply
    if status == b"paused":
        return Claimed([], paused=True)
    return Claimed(
        record.decode_claimed(flat, queue, daemon_id),
        more=status == b"more",
        due=int(due) or None,
        rate_limited=int(rate_limited),
        held=int(held),
        skipped=int(skipped),
    )


class _Waiting:
    """One job handed to `enqueue`, waiting for the call that carries it, and its answer."""

    __slots__ = ("answer", "created_at", "entries")

    def __init__(self, entries: list[Any], created_at: int, answer: asyncio.Future[str]) -> None:
        self.entries = entries  # its NEW_JOB entries
        self.created_at = created_at
        self.answer = answer  # its holder's id, or the call's error


class _Lane:
    """The jobs of one queue waiting to be enqueued, and the tasks sending them while any
    wait. One per queue and idempotency TTL: a script call takes one TTL for its jobs."""

    __slots__ = ("dedup_ttl_ms", "loop", "on_wire", "queue", "senders", "sent_at", "waiting")

    def __init__(self, queue: str, dedup_ttl_ms: int) -> None:
        self.queue = queue
        self.dedup_ttl_ms = dedup_ttl_ms
        # Kept: on Python 3.11 asyncio.get_running_loop() makes a system call (getpid).
        self.loop = asyncio.get_running_loop()
        self.waiting: list[_Waiting] = []
        self.senders: set[asyncio.Task[None]] = set()
        self.on_wire = 0  # jobs in the calls the senders have on the wire
        self.sent_at = 0.0  # loop time the latest call went out

    def may_send(self) -> bool:
        """Whether a sender may send what waits now: with no call on the wire, or beside
        one out for ENQUEUE_LANE_AFTER_S, half as many as it carries (see Store.enqueue)."""
        if not self.waiting:
            return False
        if not self.on_wire:
            return True
        return (
            len(self.waiting) >= max(ENQUEUE_LANE_MIN, self.on_wire // 2)
            and self.loop.time() - self.sent_at >= ENQUEUE_LANE_AFTER_S
        )


def _packed(conn: Any, commands: Sequence[tuple[Any, ...]]) -> bytes | list[bytes]:
    """Commands in Redis's protocol: by hiredis (C) when installed, else by redis-py."""
    if HIREDIS_AVAILABLE:
        return b"".join(map(hiredis.pack_command, commands))
    return cast(list[bytes], conn.pack_commands(commands))


# The ARCHIVED field names as a job's hash answers them (HGETALL: bytes).
_ARCHIVED_RAW = tuple(name.encode() for name in record.ARCHIVED)


@dataclass(frozen=True, slots=True, kw_only=True)
class Archived:
    """One entry taken from a queue's archive hand-off: its name there, when its job
    ended (its score), and the job's record, or None if it is gone or no longer final."""

    entry: str
    ended_at: int
    record: ArchiveRecord | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Beat:
    """What a heartbeat found: whether the daemon was still registered, whether the
    installation's marker was there, and the oldest job record layout a registered daemon
    reads (see beat.lua)."""

    registered: bool
    marked: bool
    record_version: int


class Store:
    """Typed Redis writes of one taskd installation (one key prefix), and the few reads
    the tasks need on the way (the rest are the Inspector's)."""

    def __init__(self, *, connection: Connection, archive: bool = False) -> None:
        self.connection = connection
        # Whether the jobs this daemon ends go to the archive hand-off (see archiver.py).
        self._archives = archive
        self.keys = connection.keys
        self._r = connection.client
        self._blocking = connection.blocking
        self._cluster = connection.cluster
        self._lua = scripts.load(self._r)
        self._reads = Inspector(connection=connection)
        self._lanes: dict[tuple[str, int], _Lane] = {}
        # The largest archive record of each queue's last take (take_archive), which sizes
        # the chunks of its next.
        self._archive_largest: dict[str, int] = {}
        # The job record layout it writes (record.RECORD_VERSION): the oldest one, until a
        # heartbeat finds every registered daemon reads the newer (beat).
        self.record_version = record.OLDEST_RECORD_VERSION

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        blocking_connections: int = 1,
        block_timeout: float = 5.0,
        cluster: bool = False,
        archive: bool = False,
    ) -> Store:
        """A store on a connection of its own (see connect.open); close() closes it."""
        connection = connect.open(
            url,
            prefix=prefix,
            blocking_connections=blocking_connections,
            block_timeout=block_timeout,
            cluster=cluster,
        )
        return cls(connection=connection, archive=archive)

    async def close(self) -> None:
        # Nothing submits any more; a call still in flight ends now, its waiters told so.
        senders = [sender for lane in self._lanes.values() for sender in lane.senders]
        for sender in senders:
            sender.cancel()
        if senders:
            await asyncio.wait(senders)
        # Whoever still waits is told here, also the jobs of a sender cancelled before its
        # first step.
        for lane in self._lanes.values():
            lane.senders.clear()
            _fail(lane.waiting, _closed())
            lane.waiting.clear()
        await self.connection.close()

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.connection.ping()

    async def check_writable(self) -> None:
        """Raise unless Redis answers and takes writes: one key with a second to live, so
        that a full Redis (which still answers PING) shows too (see connect.is_full)."""
        await self._r.set(self.keys.health_probe, b"1", px=1000)

    def _header(self, queue: str, now: int = 0) -> list[Any]:
        """The ARGV header of a queue script (lua/lib.lua): now, the job hash prefix and
        the limit key prefix (now 0 where the script uses none)."""
        k = self.keys
        return [now, k.job_prefix(queue), k.limit_prefix(queue)]

    def _archive(self, queue: str) -> str:
        """The archive hand-off argument of the scripts that end jobs (lua/lib.lua,
        finish_into): the queue's hand-off when this daemon archives, else ''. The scripts
        that take a job out of its final state (retry, delete, purge) get the hand-off
        whatever this daemon's config: a job another daemon handed off is kept for the
        archive all the same (keep_for_archive)."""
        return self.keys.archive(queue) if self._archives else ""

    # The reads the tasks need, which the Inspector owns.

    async def get_job(self, job_id: str, queues: Iterable[str]) -> Job | None:
        """The job with this id in any of these queues, or None."""
        return await self._reads.get_job(job_id, queues)

    async def schedule_run(self, queue: str, name: str) -> tuple[int, str | None] | None:
        """The latest tick a schedule fired or skipped, and the job it made; None if never."""
        return await self._reads.schedule_run(queue, name)

    async def known_queues(self) -> set[str]:
        return await self._reads.known_queues()

    # Submitting jobs.

    async def enqueue(self, job: Job, dedup_ttl_ms: int = DEDUP_TTL_MS) -> str:
        """Store a new job, queued or (with `run_at`) scheduled.

        Returns the id of the job that holds the submission: the job's own, or that of an
        earlier job with the same idempotency key (then nothing was added).

        A group commit: with no enqueue call of the job's queue in flight, the job goes at
        once; while one is, the jobs that arrive wait for it to answer, then go together in
        one call (up to ENQUEUE_CHUNK). No timer holds a job back, so an idle daemon adds no
        latency, and under load a job costs a fraction of a call. Each caller gets its own
        holder's id, or the error of the call that carried its job.

        A second call goes out beside one that has been on the wire for a millisecond,
        once at least half as many jobs wait as that one carries (and ENQUEUE_LANE_MIN):
        behind a long round trip they then wait for part of it, not all of it, while with
        Redis near, where a call answers sooner and fewer arrive meanwhile, calls stay as
        large and as few as with one.
        """
        # Encoded here: a job that cannot be fails its own caller, not a whole call.
        entries = record.new_job_args(job)
        lane = self._lanes.get((job.queue, dedup_ttl_ms))
        if lane is None:
            lane = self._lanes[job.queue, dedup_ttl_ms] = _Lane(job.queue, dedup_ttl_ms)
        answer: asyncio.Future[str] = lane.loop.create_future()
        lane.waiting.append(_Waiting(entries, job.created_at, answer))
        # A second sender only beside a call on the wire: one about to send takes this job.
        if not lane.senders or (
            len(lane.senders) < ENQUEUE_LANES and lane.on_wire and lane.may_send()
        ):
            lane.senders.add(lane.loop.create_task(self._send_waiting(lane)))
        try:
            return await answer
        except asyncio.CancelledError:
            if answer.done() and not answer.cancelled():
                answer.exception()  # answered as we were cancelled: read, lest it be logged
            raise

    async def _send_waiting(self, lane: _Lane) -> None:
        """Send the lane's waiting jobs, a call at a time, while any wait and it may
        (_Lane.may_send: the other sender, if any, takes them once it has its answer).

        A task of its own rather than the first caller's: a caller that goes away (its
        client left, its request's deadline passed) cancels its wait only. The call carrying
        its job runs to its end for the others, and a job whose caller went before its call
        was sent is not sent at all.
        """
        sender = asyncio.current_task()
        try:
            while lane.may_send():
                batch = [w for w in _take_batch(lane.waiting) if not w.answer.done()]
                lane.on_wire += len(batch)
                lane.sent_at = lane.loop.time()
                try:
                    await self._send_batch(lane, batch)
                finally:
                    lane.on_wire -= len(batch)
        finally:
            # Cancelled (the store closing), it leaves jobs waiting: close() answers them.
            lane.senders.discard(sender)

    async def _send_batch(self, lane: _Lane, batch: list[_Waiting]) -> None:
        if not batch:
            return
        now = max(w.created_at for w in batch)
        try:
            holders = await self._enqueue_call(
                lane.queue, now, [w.entries for w in batch], lane.dedup_ttl_ms
            )
        except Exception as exc:
            _fail(batch, exc)
            return
        except BaseException:
            _fail(batch, _closed())
            raise
        try:
            answered = list(zip(batch, holders, strict=True))
        except ValueError as exc:  # the script answered for other jobs: nobody may hang
            _fail(batch, exc)
            return
        for waiting, holder in answered:
            if not waiting.answer.done():
                waiting.answer.set_result(holder)

    async def enqueue_many(
        self, jobs: Sequence[Job], dedup_ttl_ms: int = DEDUP_TTL_MS
    ) -> list[str]:
        """Store many new jobs in few round trips: one script call per queue and chunk.

        Each call is atomic; the batch as a whole is not, but every job in it has a fresh
        id, so a client retries a failed batch whole, with new ids (or idempotency keys).
        Returns the holders' ids in the order of `jobs`, as `enqueue` does.
        """
        groups: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.queue, []).append(index)
        holders = [""] * len(jobs)
        for queue, indexes in groups.items():
            for start in range(0, len(indexes), ENQUEUE_CHUNK):
                chunk = indexes[start : start + ENQUEUE_CHUNK]
                answered = await self._enqueue_call(
                    queue,
                    max(jobs[i].created_at for i in chunk),
                    [record.new_job_args(jobs[i]) for i in chunk],
                    dedup_ttl_ms,
                )
                for index, holder in zip(chunk, answered, strict=True):
                    holders[index] = holder
        return holders

    async def _enqueue_call(
        self, queue: str, now: int, entries: Sequence[list[Any]], dedup_ttl_ms: int
    ) -> list[str]:
        """One enqueue.lua call: jobs of one queue, as their NEW_JOB entries."""
        k = self.keys
        args = self._header(queue, now)
        args += [self.record_version, queue, k.idempotency_prefix(queue), dedup_ttl_ms]
        args.append(now // record.BUCKET_MS)
        for job_entries in entries:
            args += job_entries
        keys = [k.inbox(queue), k.scheduled(queue), k.index(queue), k.totals(queue)]
        keys += [k.arrivals(queue), k.pages(queue)]
        return [text(holder) for holder in await self._script("enqueue", keys, args)]

    # Running jobs.

    async def claim(
        self,
        queue: str,
        daemon_id: str,
        most: int,
        now: int,
        type_limits: Sequence[TypeLimits],
        free: Mapping[str, int] | None = None,
    ) -> Claimed:
        """Move up to `most` ready jobs, highest priority first, into this daemon's active
        set and return them: only jobs of the types in `type_limits` (those this daemon has a
        handler for), at most `free[type]` of a type (absent: no local cap). Jobs over
        their type's global limits wait; the others stay ready (see claim.lua)."""
        request = ClaimRequest(most, now, type_limits, free or {})
        keys, args = self._claim_call(queue, daemon_id, request)
        reply = await self._script("claim", keys, args)
        return _claimed(reply, queue, daemon_id)

    def _claim_call(
        self, queue: str, daemon_id: str, request: ClaimRequest
    ) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [k.inbox(queue), k.landing(queue, daemon_id), k.active(queue, daemon_id)]
        keys += [k.leases(queue), k.paused(queue), k.waits(queue), k.scheduled(queue)]
        keys += [k.totals(queue), k.limit_waits(queue), k.unhandled(queue)]
        args = [*self._header(queue, request.now), request.most, daemon_id, TIMING_SAMPLES]
        for spec in request.type_limits:
            args += record.type_limits_args(spec, request.free.get(spec.job_type, -1))
        return keys, args

    async def wait_for_job(self, queue: str, daemon_id: str, block_seconds: int) -> bool:
        """Block until a job is ready, moving its id into this daemon's landing list.

        The id is then taken by the next `claim`. Blocking only happens when the queue is
        empty, and it returns the moment a job arrives: no polling on the pick-up path.
        """
        k = self.keys
        moved = await self._blocking.blmove(
            k.inbox(queue), k.landing(queue, daemon_id), block_seconds, "RIGHT", "LEFT"
        )
        return moved is not None

    async def ack(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], now: int
    ) -> list[bool]:
        """Record finished attempts of one queue in one script call; returns, for each,
        whether it was recorded (False: it was no longer this daemon's)."""
        keys, args = self._ack_call(queue, daemon_id, attempts, now)
        return [bool(flag) for flag in await self._script("ack", keys, args)]

    async def ack_and_claim(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], request: ClaimRequest
    ) -> tuple[list[bool], Claimed | Exception]:
        """ack() these attempts, then claim() as `request` says, in one round trip; the
        claim's error, if only the claim failed, is answered beside the ack's flags (the
        ack is recorded all the same), and raised if the ack failed.

        Pipelined on one connection, the claim runs after the ack, so the slots the ack
        frees in Redis are free when it runs, and a daemon still never holds more jobs
        there than it has slots; the round trip a claim would wait for on its own after
        each ack is saved. Not a transaction: should the connection fail, either may have
        run, as with two calls (the acker sends the ack again, and a claim whose answer
        was lost is returned by the pool's orphan release).
        """
        ack_keys, ack_args = self._ack_call(queue, daemon_id, attempts, request.now)
        claim_keys, claim_args = self._claim_call(queue, daemon_id, request)
        acked, claimed = await self._scripts(
            [("ack", ack_keys, ack_args), ("claim", claim_keys, claim_args)]
        )
        if isinstance(acked, Exception):
            raise acked
        flags = [bool(flag) for flag in acked]
        if isinstance(claimed, Exception):
            return flags, claimed
        try:
            return flags, _claimed(claimed, queue, daemon_id)
        except Exception as exc:  # an answer it cannot read: the claim's failure, not the ack's
            return flags, exc

    def _ack_call(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], now: int
    ) -> tuple[list[str], list[Any]]:
        k = self.keys
        args = [*self._header(queue, now), now // record.BUCKET_MS, TIMING_SAMPLES, daemon_id]
        args.append(self._archive(queue))
        for a in attempts:
            args += record.attempt_args(a)
        keys = [
            k.active(queue, daemon_id),
            k.completed(queue),
            k.failed(queue),
            k.scheduled(queue),
            k.cancelled(queue),
            k.totals(queue),
            k.throughput(queue),
            k.runs(queue),
            k.inbox(queue),
            k.callbacks(queue),
        ]
        return keys, args

    async def report_progress(
        self, job: Job, daemon_id: str, value: float, message: str, now: int
    ) -> bool:
        """Record a running attempt's progress; False if the attempt is no longer ours."""
        k = self.keys
        keys = [k.active(job.queue, daemon_id), k.job(job.queue, job.id)]
        args = [*self._header(job.queue, now), job.id, job.attempts, repr(value), message]
        return bool(await self._lua["progress"](keys=keys, args=args))

    async def still_owned(self, queue: str, daemon_id: str, job_ids: Sequence[str]) -> set[str]:
        """Which of these ids are still in this daemon's active set."""
        if not job_ids:
            return set()
        scores = await self._r.zmscore(self.keys.active(queue, daemon_id), list(job_ids))
        return {job_id for job_id, score in zip(job_ids, scores, strict=True) if score is not None}

    async def requeue_inflight(self, queue: str, daemon_id: str, now: int) -> int:
        """Return all of a daemon's unfinished jobs of one queue to the ready list."""
        keys, args = self._requeue_call(queue, daemon_id, now)
        total = 0
        while moved := int(await self._lua["requeue"](keys=keys, args=args)):
            total += moved
        return total

    async def claimed_before(self, queue: str, daemon_id: str, before: int) -> list[str]:
        """Ids in a daemon's active set that it claimed before `before` (epoch ms)."""
        ids = await self._r.zrangebyscore(self.keys.active(queue, daemon_id), "-inf", f"({before}")
        return [text(job_id) for job_id in ids]

    async def requeue(self, queue: str, daemon_id: str, job_ids: Sequence[str], now: int) -> int:
        """Return these ids, if still in the daemon's active set, to the ready list."""
        keys, args = self._requeue_call(queue, daemon_id, now)
        return int(await self._lua["requeue"](keys=keys, args=[*args, *job_ids]))

    def _requeue_call(self, queue: str, daemon_id: str, now: int) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [k.inbox(queue), k.landing(queue, daemon_id), k.active(queue, daemon_id)]
        keys += [k.cancelled(queue), k.totals(queue), k.callbacks(queue)]
        return keys, [*self._header(queue, now), BATCH, self._archive(queue)]

    async def promote(self, queue: str, now: int) -> tuple[int, int | None]:
        """Move due jobs to the ready list; returns (moved, when the next one is due)."""
        k = self.keys
        moved, due = await self._lua["promote"](
            keys=[k.scheduled(queue), k.inbox(queue)], args=[*self._header(queue, now), BATCH]
        )
        return int(moved), (None if int(due) < 0 else int(due))

    # Callbacks.

    async def take_callbacks(self, queue: str, daemon_id: str, most: int, now: int) -> list[str]:
        """Move up to `most` ids from the queue's callback outbox into this daemon's
        callbacks in flight, and return them."""
        k = self.keys
        keys = [k.callbacks(queue), k.sending(queue, daemon_id), k.leases(queue)]
        ids = await self._lua["take_callbacks"](
            keys=keys, args=[*self._header(queue, now), most, daemon_id]
        )
        return [text(job_id) for job_id in ids]

    async def sending_before(self, queue: str, daemon_id: str, before: int) -> list[str]:
        """Callbacks in a daemon's set in flight that it took before `before` (epoch ms)."""
        ids = await self._r.zrangebyscore(self.keys.sending(queue, daemon_id), "-inf", f"({before}")
        return [text(job_id) for job_id in ids]

    async def callback_done(self, queue: str, daemon_id: str, job_id: str, outcome: str) -> bool:
        """End a callback in flight: 'sent', 'failed' (both counted), 'dropped' (its job is
        gone) or 'returned' to the outbox; False if it was no longer this daemon's."""
        k = self.keys
        keys = [k.sending(queue, daemon_id), k.totals(queue), k.callbacks(queue)]
        return bool(await self._lua["callback_done"](keys=keys, args=[job_id, outcome]))

    # The archive hand-off (see archiver.py).

    async def take_archive(
        self, queue: str, daemon_id: str, most: int, lease_ms: int, *, skip: int = 0
    ) -> list[Archived] | None:
        """The oldest entries of the queue's archive hand-off after the first `skip` (those
        being written), `most` of them or those of ARCHIVE_BYTES, with their jobs (None for
        an entry whose record is gone or no longer final); None if another daemon archives
        the queue. The lease first, then the entries and their records, read by plain
        commands (see archive_lease.lua)."""
        k = self.keys
        if not await self._script("archive_lease", [k.archive_lock(queue)], [daemon_id, lease_ms]):
            return None
        oldest = await self._r.zrange(k.archive(queue), skip, skip + most - 1, withscores=True)
        entries = [
            (text(entry), int(score)) for entry, score in cast(list[tuple[bytes, float]], oldest)
        ]
        records = await self._archive_records_within(queue, [entry for entry, _ in entries])
        # The entries not read (past ARCHIVE_BYTES) are the next batch's.
        return [
            Archived(entry=entry, ended_at=ended_at, record=found)
            for (entry, ended_at), found in zip(entries, records, strict=False)
        ]

    async def _archive_records_within(
        self, queue: str, entries: list[str]
    ) -> list[ArchiveRecord | None]:
        """The records of the first entries, up to ARCHIVE_BYTES of them (see there)."""
        records: list[ArchiveRecord | None] = []
        size = largest = 0
        hint = self._archive_largest.get(queue, ARCHIVE_BYTES // ARCHIVE_CHUNK)
        while len(records) < len(entries) and size < ARCHIVE_BYTES:
            fit = (ARCHIVE_BYTES - size) // max(hint, largest, 1)
            chunk = entries[len(records) : len(records) + max(fit, 1)]
            read = await self._archived_records(queue, chunk)
            sizes = [found.size for found in read if found is not None]
            size += sum(sizes)
            largest = max([largest, *sizes])
            records += read
        if largest:
            self._archive_largest[queue] = largest
        return records

    async def _archived_records(self, queue: str, entries: list[str]) -> list[ArchiveRecord | None]:
        """The record each hand-off entry names: the job's hash, or for a kept copy
        (<id>@<finished_at>) the copy. HGETALL rather than HMGET of the ARCHIVED fields:
        HMGET's answer by position saves the archiver process 3 µs a job, but costs Redis,
        the one thread every daemon shares, 0.8-1.1 µs a job more in all (its 15 field
        names to parse; 2026-12-08), and the archive kept up with the drain either way."""
        if not entries:
            return []
        k = self.keys
        kept = [entry for entry in entries if "@" in entry]
        copies: Iterator[bytes | None] = iter(
            cast(list[bytes | None], await self._r.hmget(k.archive_kept(queue), kept))
            if kept
            else ()
        )
        jobs = [k.job(queue, entry) for entry in entries if "@" not in entry]
        hashes = iter(await self._hashes(jobs))
        found: list[ArchiveRecord | None] = []
        for entry in entries:
            job_id, copy, _ = entry.partition("@")
            fields: list[bytes | None] | bytes | None
            if copy:
                fields = next(copies)
            else:
                named = next(hashes)
                fields = [named.get(name) for name in _ARCHIVED_RAW] if named else None
            found.append(record.decode_archive_record(fields, queue, job_id))
        return found

    async def _hashes(self, keys: list[str]) -> list[dict[bytes, bytes]]:
        """Every field of each hash (HGETALL), many at once (see _together)."""
        replies = await self._together([("HGETALL", key) for key in keys])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        # A map in RESP3 (redis-py's default), field, value pairs in RESP2.
        return [
            reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
            for reply in replies
        ]

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script (see _scripts); its error raised."""
        [answer] = await self._scripts([(name, keys, args)])
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def _scripts(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run scripts, each (name, keys, args), in order in one round trip (_together):
        the calls of the hot paths, whose arguments are many. Answers as _together's. A
        script Redis lacks (restarted or flushed since the scripts were loaded) runs again
        on its own, which loads it."""
        answers = await self._together(
            [
                ("EVALSHA", self._lua[name].sha, len(keys), *keys, *args)
                for name, keys, args in calls
            ]
        )
        for n, (name, keys, args) in enumerate(calls):
            if isinstance(answers[n], redis.exceptions.NoScriptError):
                try:
                    answers[n] = await self._lua[name](keys=keys, args=args)
                except redis.exceptions.ResponseError as exc:
                    answers[n] = exc
        return answers

    async def _together(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one write on one connection of the pool and read their answers
        (an error answer as its exception, in its place), under one deadline for all.

        For the calls that carry many arguments or answers: redis-py's pipeline packs each
        argument in Python (about 0.45 µs each, 600 for an acknowledgement of 100 jobs)
        and reads each answer under a deadline of its own and through its callbacks (some
        11 µs an answer on top of the 5 µs reading it takes). hiredis packs the commands
        here. One attempt, as redis-py's commands make here: the caller retries. Cut short
        (the deadline, a cancellation, a lost connection) the connection is closed, not
        given back with answers still to come. A cluster's client has no single pool: it
        sends them as a pipeline.
        """
        if not commands:
            return []
        if self.connection.cluster:
            async with self._r.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute(raise_on_error=False)
        pool = self._r.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            with anyio.fail_after(connect.COMMAND_TIMEOUT):
                await conn.send_packed_command(_packed(conn, commands))
                answers: list[Any] = []
                for _ in commands:
                    try:
                        # timeout=inf: no deadline of each answer's own (see above).
                        answers.append(await conn.read_response(timeout=math.inf))
                    except redis.exceptions.ResponseError as exc:
                        answers.append(exc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return answers

    async def archive_done(
        self, queue: str, daemon_id: str, done: Sequence[Archived], *, release: bool = False
    ) -> int:
        """Remove entries written to the archive from the hand-off (each only if it still
        ends at the same time); `release` gives up the queue's archive lock as well, if
        this daemon holds it. Returns how many entries were removed."""
        k = self.keys
        keys = [k.archive(queue), k.archive_kept(queue), k.archive_lock(queue)]
        args: list[Any] = [daemon_id, 1 if release else 0]
        for each in done:
            args += [each.entry, each.ended_at]
        return int(await self._script("archive_done", keys, args))

    # Recurring schedules.

    async def record_schedule_run(self, queue: str, name: str, tick: int, job_id: str) -> bool:
        keys = [self.keys.schedules(queue)]
        return bool(await self._lua["schedule"](keys=keys, args=[name, tick, job_id]))

    # Pausing queues.

    async def pause(self, queue: str) -> None:
        await self._r.set(self.keys.paused(queue), 1)

    async def resume(self, queue: str) -> None:
        await self._r.delete(self.keys.paused(queue))

    # Acting on one job.

    async def cancel(self, queue: str, job_id: str, now: int) -> str:
        """Cancel a job; returns its state before (see cancel.lua)."""
        k = self.keys
        keys = [k.job(queue, job_id), k.inbox(queue), k.scheduled(queue)]
        keys += [k.cancelled(queue), k.totals(queue), k.callbacks(queue)]
        args = [*self._header(queue, now), job_id, k.cancel_channel, self._archive(queue)]
        state = await self._lua["cancel"](keys=keys, args=args)
        return text(state)

    async def retry(self, queue: str, job_id: str, now: int) -> str:
        """Put a failed job back on its queue; returns its state before (see retry.lua)."""
        k = self.keys
        keys = [k.job(queue, job_id), k.failed(queue), k.inbox(queue)]
        args = [*self._header(queue, now), job_id, k.archive(queue)]
        return text(await self._lua["retry"](keys=keys, args=args))

    async def unindex_gone(self, gone: Sequence[tuple[str, str]]) -> int:
        """Take out of their queue's index the ids of these (queue, id) pairs whose record
        is gone (see unindex_gone.lua, Page.gone); how many."""
        by_queue: dict[str, list[str]] = {}
        for queue, job_id in gone:
            by_queue.setdefault(queue, []).append(job_id)
        total = 0
        for queue, ids in by_queue.items():
            keys = [self.keys.index(queue), self.keys.pages(queue)]
            total += int(
                await self._lua["unindex_gone"](keys=keys, args=[*self._header(queue), *ids])
            )
        return total

    async def delete(self, queue: str, job_id: str) -> str:
        """Delete a job that is not running; returns its state before (see delete.lua)."""
        k = self.keys
        keys = [k.job(queue, job_id), k.inbox(queue), k.scheduled(queue), k.completed(queue)]
        keys += [k.failed(queue), k.cancelled(queue), k.index(queue), k.pages(queue)]
        args = [*self._header(queue), job_id, k.archive(queue), k.idempotency_prefix(queue)]
        return text(await self._lua["delete"](keys=keys, args=args))

    # Acting on many jobs, a batch per script call (BATCH) so that Redis serves other
    # commands in between: callers see each batch as it is done.

    async def purge(self, queue: str, state: str, now: int) -> AsyncIterator[int]:
        """Delete a queue's jobs in `state` (one of PURGEABLE: queued, scheduled, failed) and
        their ids wherever they wait; yields how many each batch deleted (see purge.lua).
        `now`: when the purge began (dead letters that failed later are kept).

        It stops once nothing is left to take, or once it has taken as many ids as the
        state held at its first batch, so that jobs arriving as fast as it deletes cannot
        keep it going: of the jobs that arrive meanwhile, some may be purged, some not.
        """
        k = self.keys
        keys = [k.inbox(queue), k.scheduled(queue), k.failed(queue), k.index(queue)]
        keys += [k.leases(queue), k.limit_waits(queue), k.pages(queue)]
        after = [state, k.idempotency_prefix(queue), k.landing_prefix(queue)]
        after.append(k.archive(queue))
        # Ids it may still take: what the state held after the first batch.
        budget: int | None = None
        while True:
            most = BATCH if budget is None else min(BATCH, budget)
            args = [*self._header(queue, now), most, *after]
            removed, taken, left = await self._lua["purge"](keys=keys, args=args)
            budget = left if budget is None else budget - taken
            yield int(removed)
            if taken == 0 or budget <= 0:
                return

    async def retry_dead(
        self, queue: str, now: int, job_type: str | None = None
    ) -> AsyncIterator[int]:
        """Put a queue's dead letters (of one type, or all) back on it, as `retry` does,
        oldest first; yields how many each batch retried (see retry_dead.lua). `now`: when
        the retry began; a job that fails again after it is not retried again."""
        k = self.keys
        keys = [k.failed(queue), k.inbox(queue)]
        after: Any = ""
        score: Any = ""
        while True:
            args = [*self._header(queue, now), BATCH, job_type or "", after, score]
            args.append(k.archive(queue))
            retried, _, done, after, score = await self._lua["retry_dead"](keys=keys, args=args)
            yield int(retried)
            if done:
                return

    @asynccontextmanager
    async def cancel_requests(self) -> AsyncIterator[AsyncIterator[str]]:
        """Subscribe to cancel requests; yields an iterator of job ids as they arrive."""
        if self._cluster:
            # Its pub/sub finds the node of the channel from the slot map, which the
            # cluster client reads at its first command: read it now.
            await cast(RedisCluster, self._blocking).initialize()
        pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.cancel_channel)
            yield _messages(pubsub)
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2

    # Recovering the jobs of dead daemons, and expiring finished ones.

    async def stale_leases(self, queue: str, before: int) -> list[str]:
        """Daemons whose lease on this queue was last renewed before `before`."""
        ids = await self._r.zrangebyscore(self.keys.leases(queue), "-inf", f"({before}")
        return [text(daemon_id) for daemon_id in ids]

    async def recover(self, queue: str, daemon_id: str, now: int, before: int) -> int:
        """Take back all jobs (and callbacks in flight) of a daemon whose lease lapsed;
        returns how many jobs, or -1 if its lease is alive."""
        k = self.keys
        keys = [k.leases(queue), k.inbox(queue), k.landing(queue, daemon_id)]
        keys += [k.active(queue, daemon_id), k.failed(queue), k.cancelled(queue), k.totals(queue)]
        keys += [k.callbacks(queue), k.sending(queue, daemon_id)]
        args = [*self._header(queue, now), daemon_id, before, BATCH, self._archive(queue)]
        total = 0
        while True:
            jobs, callbacks = await self._lua["recover"](keys=keys, args=args)
            if jobs < 0:
                return -1 if total == 0 else total
            if jobs == callbacks == 0:
                return total
            total += jobs

    async def trim(self, queue: str, state: str, cutoff: int) -> int:
        """Delete jobs of a final state that finished at or before `cutoff`."""
        k = self.keys
        keys = [k.finished(queue, state), k.index(queue), k.archive(queue), k.pages(queue)]
        total = kept = 0
        more = 1
        # Jobs kept for the archive are looked past: the oldest waiting must not keep the
        # newer ones that are archived (or were never handed off) in Redis for ever.
        while more and kept <= TRIM_KEPT_MOST:
            args = [*self._header(queue), cutoff, BATCH, kept]
            deleted, held, more = await self._lua["trim"](keys=keys, args=args)
            total += int(deleted)
            kept += int(held)
        return total

    # Daemons.

    async def beat(self, info: DaemonInfo) -> Beat:
        """Write a daemon's record and heartbeat (see beat.lua)."""
        k = self.keys
        known, marked, oldest = await self._lua["beat"](
            keys=[k.daemons, k.daemon(info.id), k.marker, k.record_versions],
            args=[info.last_heartbeat, info.id, record.RECORD_VERSION, *record.daemon_args(info)],
        )
        if oldest != self.record_version:
            self.record_version = int(oldest)
            logger.info("%s", _LAYOUT_NEWS[self.record_version])
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in info.queues:
                pipe.zadd(k.leases(queue), {info.id: info.last_heartbeat})
            pipe.sadd(k.queues, *info.queues)
            await pipe.execute()
        return Beat(registered=bool(known), marked=bool(marked), record_version=int(oldest))

    async def deregister_daemon(self, daemon_id: str, queues: Sequence[str]) -> None:
        """Remove a daemon that stopped cleanly (its in-flight keys are already empty)."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.daemon(daemon_id))
            pipe.zrem(self.keys.daemons, daemon_id)
            await pipe.execute()
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zrem(self.keys.leases(queue), daemon_id)
            await pipe.execute()

    async def stale_daemons(self, before: int) -> list[str]:
        ids = await self._r.zrangebyscore(self.keys.daemons, "-inf", f"({before}")
        return [text(daemon_id) for daemon_id in ids]

    async def forget_daemon(self, daemon_id: str, before: int) -> bool:
        """Remove a dead daemon's record, unless it beat again since `before`."""
        k = self.keys
        keys = [k.daemons, k.daemon(daemon_id)]
        return bool(await self._lua["forget"](keys=keys, args=[daemon_id, before]))

    async def add_queues(self, queues: Iterable[str]) -> None:
        """Remember queue names, so that /stats, lookups and reapers know them."""
        names = list(queues)
        if names:
            await self._r.sadd(self.keys.queues, *names)

    async def forget_queue(self, queue: str) -> tuple[int, int, int]:
        """Forget a queue that holds nothing (see forget_queue.lua); returns what it still
        holds, (jobs, leases, callbacks), all 0 when it was forgotten."""
        k = self.keys
        keys = [k.index(queue), k.leases(queue), k.callbacks(queue), k.archive(queue)]
        keys += [k.pages(queue), *k.queue_state(queue)]
        jobs, leases, callbacks = await self._lua["forget_queue"](
            keys=keys, args=self._header(queue)
        )
        if jobs == leases == callbacks == 0:
            await self._r.srem(k.queues, queue)
        return int(jobs), int(leases), int(callbacks)

    async def free_held(self, queue: str, job_types: Sequence[str]) -> int:
        """Return to the ready jobs the held jobs of these types, which have no
        global_concurrency any more (see free_held.lua); how many."""
        if not job_types:
            return 0
        k = self.keys
        args = [*self._header(queue), BATCH, *job_types]
        total = 0
        while freed := int(await self._lua["free_held"](keys=[k.inbox(queue)], args=args)):
            total += freed
        return total

    async def flush_all(self) -> None:
        """Delete every key of the Redis database, not only this installation's: for a
        throwaway Redis only (the bench's, between rounds)."""
        await self._r.flushall()

    async def trim_throughput(self, queue: str, now: int) -> None:
        """Forget throughput and arrivals buckets older than THROUGHPUT_KEEP_MS."""
        oldest = (now - THROUGHPUT_KEEP_MS) // record.BUCKET_MS
        for key in (self.keys.throughput(queue), self.keys.arrivals(queue)):
            stale = [field for field in await self._r.hkeys(key) if int(field) < oldest]
            if stale:
                await self._r.hdel(key, *stale)


def _fail(waiting: Iterable[_Waiting], error: Exception) -> None:
    """Answer these waiting jobs, those still waited for, with the error of their call."""
    for each in waiting:
        if not each.answer.done():
            each.answer.set_exception(error)


def _closed() -> Exception:
    # A connection error, as the callers of a closed store's connection would get.
    return redis.exceptions.ConnectionError("the store closed before the job was enqueued")


async def _messages(pubsub: PubSub) -> AsyncIterator[str]:
    while True:
        # A bounded wait: an idle subscription must not trip the connection's read timeout.
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None and message["type"] == "message":
            yield text(message["data"])


_PAYLOAD = record.NEW_JOB.index("payload")

# What the store writes from now on, logged as the oldest record layout registered changes.
_LAYOUT_NEWS = {
    1: "a daemon of an older taskd is registered: new jobs' records carry their id and "
    "queue for it, and are indexed in the sorted set it reads",
    2: "a daemon of an older taskd is registered: new jobs are indexed in the sorted set it reads",
    3: "every registered daemon reads job records without their id and queue, and the "
    "paged index: new jobs' records leave them out, and are indexed in pages",
}


def _take_batch(waiting: list[_Waiting]) -> list[_Waiting]:
    """The first of `waiting`, up to ENQUEUE_CHUNK jobs and ENQUEUE_BYTES of payload (at
    least one job), taken off the list."""
    size = 0
    count = 0
    for w in waiting[:ENQUEUE_CHUNK]:
        size += len(w.entries[_PAYLOAD])
        if count and size > ENQUEUE_BYTES:
            break
        count += 1
    batch = waiting[:count]
    del waiting[:count]
    return batch
