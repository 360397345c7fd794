"""The workloads a default run measures: intake, drain, pickup, concurrency and mixed."""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import orjson

from taskd.bench import remote
from taskd.bench.harness import POLL, PREFIX, QUEUE, Bench, BenchError, Local, Spawned
from taskd.bench.loadgen import Target, post_request, send_from_clients
from taskd.bench.remote import PICKUP_RATE
from taskd.bench.report import Figure, latency_figures, percentile
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Inspector, Store

# Concurrent keep-alive clients of intake-single, here and against --url.
SINGLE_CLIENTS = 100
BATCH_CLIENTS = 4
BATCH_SIZE = 1_000
PICKUP_WARMUP = 5
MIXED_DAEMONS = 3
MIXED_SLEEP_MAX = 0.005  # s


async def stamp(job: Job) -> dict[str, int]:
    """The `stamp` handler: when it started, in ns, for the pickup workload."""
    return {"t": time.time_ns()}


async def intake_single(bench: Bench) -> list[Figure]:
    """POST /jobs, one noop job per request, from 100 keep-alive clients: jobs/s accepted,
    each request's latency, and what a job cost Redis, the daemon and the bench's client."""
    n = bench.size("intake-single")
    async with bench.intake() as url, paused(bench, url):
        daemon = bench.local.running[0] if bench.local is not None else None
        cpu = daemon.cpu_seconds() if daemon is not None else None
        commands = await _commands(bench)
        client_cpu = time.process_time()
        elapsed, latencies = await post_singles(bench, url, n)
        client_cpu = time.process_time() - client_cpu
        commands = await _commands(bench) - commands
        used = daemon_cpu(daemon, cpu, n)
    figures = [Figure("accepted", "jobs/s", n / elapsed), *latency_figures(latencies)]
    # The client shares the machine with the daemon (and Redis): what it takes is not
    # the daemon's to use.
    client = Figure("bench client CPU", "µs/job", client_cpu / n * 1e6)
    floor = await aiohttp_alone(bench, n) if bench.local is not None else []
    return [*figures, *_per_job(commands, n), *used, client, *floor]


async def aiohttp_alone(bench: Bench, n: int) -> list[Figure]:
    """The same requests from the same clients, to aiohttp alone (taskd.bench.floor): the
    rate no aiohttp intake here could pass, and what a request costs aiohttp itself."""
    async with bench.floor() as floor:
        cpu = floor.cpu_seconds()
        elapsed, _ = await post_singles(bench, floor.url, n)
        used = daemon_cpu(floor, cpu, n)
    return [
        Figure("aiohttp alone", "jobs/s", n / elapsed),
        *(Figure("aiohttp alone CPU", f.unit, f.value) for f in used),
    ]


async def post_singles(bench: Bench, url: str, n: int) -> tuple[float, list[float]]:
    """`n` noop jobs POSTed to /jobs, one a request, from SINGLE_CLIENTS keep-alive clients:
    the seconds it took, and each request's latency in ms."""
    target = Target.from_url(bench.unix_url or url)
    request = post_request(target, "/jobs", orjson.dumps({"type": "noop"}))
    started = time.perf_counter()
    latencies = await send_from_clients(target, "/jobs", request, SINGLE_CLIENTS, n)
    return time.perf_counter() - started, latencies


async def intake_batch(bench: Bench) -> list[Figure]:
    """POST /jobs/batch, 1,000 noop jobs per request, from 4 clients: jobs/s accepted."""
    n = bench.size("intake-batch")
    body = orjson.dumps({"jobs": [{"type": "noop"}] * BATCH_SIZE})
    requests = math.ceil(n / BATCH_SIZE)
    async with bench.intake() as url, paused(bench, url):
        commands = await _commands(bench)
        started = time.perf_counter()
        await _clients(
            BATCH_CLIENTS, requests, lambda: bench.call("POST", f"{url}/jobs/batch", body)
        )
        elapsed = time.perf_counter() - started
        commands = await _commands(bench) - commands
    jobs = requests * BATCH_SIZE
    return [Figure("accepted", "jobs/s", jobs / elapsed), *_per_job(commands, jobs)]


async def _commands(bench: Bench) -> float:
    """Commands the bench's Redis ran so far (scripts' own included); NaN against --url,
    whose Redis the bench does not see."""
    if bench.local is None:
        return math.nan
    return await bench.local.inspector.commands_called()


def daemon_cpu(
    daemon: Spawned | None, before: float | None, jobs: int, suffix: str = ""
) -> list[Figure]:
    """The daemon's CPU time since `before`, per job; none against --url (no daemon of
    ours) or where /proc does not tell."""
    after = daemon.cpu_seconds() if daemon is not None else None
    if before is None or after is None:
        return []
    return [Figure(f"daemon CPU{suffix}", "µs/job", (after - before) / jobs * 1e6)]


def _per_job(commands: float, jobs: int) -> list[Figure]:
    """The Redis commands figure, where the bench could count them."""
    if math.isnan(commands):
        return []
    # Besides the workload's, a few commands of the bench's polling and the daemons'
    # heartbeats: under 0.01 per job at full sizes.
    return [Figure("Redis commands", "per job", commands / jobs)]


async def _clients(clients: int, requests: int, send: Callable[[], Awaitable[object]]) -> None:
    """`clients` concurrent loops sharing `requests` calls of `send`."""
    left = requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await send()

    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(client)


@asynccontextmanager
async def paused(bench: Bench, url: str) -> AsyncIterator[None]:
    """Hold the queue of noop jobs paused, so that running them does not compete with intake.

    A queue someone else paused stays paused; one we paused is resumed, even on Ctrl-C.
    """
    # One job first: it tells the queue, and opens a connection and loads the script.
    job = await bench.json("POST", f"{url}/jobs", orjson.dumps({"type": "noop"}))
    queue = str(job["queue"])
    stats = await bench.json("GET", f"{url}/stats")
    if stats.get("queues", {}).get(queue, {}).get("paused"):
        yield
        return
    await bench.call("POST", f"{url}/queues/{queue}/pause")
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await bench.call("POST", f"{url}/queues/{queue}/resume")


async def drain(bench: Bench) -> list[Figure]:
    """N noop jobs waiting, then one daemon (100 slots): jobs/s, first start to last finish."""
    local = bench.need_local()
    n = bench.size("drain")
    # Straight into Redis: no daemon may run while they are put there.
    ids = await local.enqueue(n, "noop", None)
    # Paused while the daemon starts, so that the CPU time and the commands counted are
    # those of the drain alone.
    await local.store.pause(QUEUE)
    async with bench.daemons(1, concurrency=100) as [daemon]:
        cpu, commands = daemon.cpu_seconds(), await _commands(bench)
        redis_cpu = await local.inspector.cpu_seconds()
        await local.store.resume(QUEUE)
        await bench.wait_finished(n)
        redis_cpu = await local.inspector.cpu_seconds() - redis_cpu
        commands = await _commands(bench) - commands
        used = daemon_cpu(daemon, cpu, n)
    rows = await local.records(ids, ("started_at", "finished_at"))
    # Beside the daemon's: a drain is the two taking turns (docs/performance.md).
    redis = Figure("Redis CPU", "µs/job", redis_cpu / n * 1e6)
    return [Figure("throughput", "jobs/s", n / span(rows)), *_per_job(commands, n), *used, redis]


async def pickup(bench: Bench) -> list[Figure]:
    """An idle daemon, jobs arriving one at a time at 200/s: from enqueue to handler start."""
    if bench.local is None:
        return await remote.pickup(bench)
    local = bench.local
    n = bench.size("pickup")
    async with bench.daemons(1, concurrency=100):
        # A few jobs first, so that connections and scripts are warm and the daemon idles.
        await _paced_enqueue(local.store, PICKUP_WARMUP)
        await bench.wait_finished(PICKUP_WARMUP)
        sent = await _paced_enqueue(local.store, n)
        await bench.wait_finished(PICKUP_WARMUP + n)
    started = await stamps(local, [job_id for job_id, _ in sent])
    return latency_figures([(t - t0) / 1e6 for (_, t0), t in zip(sent, started, strict=True)])


async def stamps(local: Local, ids: Sequence[str]) -> list[int]:
    """When the handler of each of these stamp jobs started (ns), in the order of `ids`."""
    rows = await local.records(ids, ("result",))
    return [int(orjson.loads(_result(row["result"]))["t"]) for row in rows]


async def _paced_enqueue(store: Store, count: int) -> list[tuple[str, int]]:
    """Enqueue `count` stamp jobs at PICKUP_RATE; returns (id, ns just before enqueueing)."""
    sent: list[tuple[str, int]] = []
    begin = anyio.current_time()
    for i in range(count):
        await anyio.sleep_until(begin + i / PICKUP_RATE)
        job = Job(new_id(), "stamp", QUEUE, None, QUEUED, 0, now_ms(), max_attempts=1)
        # t0 is read before the enqueue goes out; the job becomes visible once Redis runs
        # the script, so the latency is overstated by at most half a round trip.
        t0 = time.time_ns()
        await store.enqueue(job)
        sent.append((job.id, t0))
    return sent


async def concurrency(bench: Bench) -> list[Figure]:
    """N jobs sleeping 1 s, one daemon with N slots: wall time, its peak RSS, Redis connections."""
    local = bench.need_local()
    n = bench.size("concurrency")
    ids = await local.enqueue(n, "sleep", {"seconds": 1})
    async with _connections(local) as connections, bench.daemons(1, concurrency=n) as [daemon]:
        await bench.wait_finished(n)
        rss = daemon.peak_rss_mib()
    rows = await local.records(ids, ("started_at", "finished_at"))
    bench.note(
        "concurrency: Redis connections are the peak of INFO clients connected_clients, less "
        f"the bench's own ({connections.own}, counted before the daemon started)"
    )
    figures = [Figure("wall time", "s", span(rows))]
    if rss is not None:
        figures.append(Figure("daemon peak RSS", "MiB", rss))
    return [*figures, Figure("peak Redis connections", "conns", connections.peak - connections.own)]


@dataclass
class _Connections:
    own: int = 0
    peak: int = 0


@asynccontextmanager
async def _connections(local: Local) -> AsyncIterator[_Connections]:
    """Sample INFO clients every 50 ms while inside; `own` is the count on entry."""
    seen = _Connections()
    # A connection of its own, used by one sampler at a time, so the bench's count stays
    # the same while it polls.
    store = Store.from_url(local.redis_url, prefix=PREFIX)
    inspector = Inspector(connection=store.connection)
    try:
        seen.own = seen.peak = await inspector.connected_clients()

        async def sample() -> None:
            while True:
                seen.peak = max(seen.peak, await inspector.connected_clients())
                await anyio.sleep(POLL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            yield seen
            tg.cancel_scope.cancel()
    finally:
        await store.close()


async def mixed(bench: Bench) -> list[Figure]:
    """3 daemons (100 slots each), N jobs sleeping 0-5 ms sent in batches meanwhile."""
    local = bench.need_local()
    n = bench.size("mixed")
    bodies = list(_sleep_batches(n))
    async with bench.daemons(MIXED_DAEMONS, concurrency=100) as daemons:
        ids = await _submit_batches(bench, [d.url for d in daemons], bodies)
        await bench.wait_finished(n)
    rows = await local.records(ids, ("created_at", "run_at", "started_at", "finished_at"))
    waits = [
        _int(row["started_at"]) - max(_int(row["created_at"]), int(row["run_at"] or 0))
        for row in rows
    ]
    return [
        Figure("throughput", "jobs/s", n / span(rows)),
        Figure("pickup p99", "ms", percentile(waits, 0.99)),
    ]


def _sleep_batches(n: int) -> Iterator[bytes]:
    """Bodies for POST /jobs/batch: `n` sleep jobs of 0-5 ms, made before the clock starts."""
    rng = random.Random(1)  # the same jobs every round
    for start in range(0, n, BATCH_SIZE):
        jobs = [
            {"type": "sleep", "payload": {"seconds": rng.uniform(0, MIXED_SLEEP_MAX)}}
            for _ in range(min(BATCH_SIZE, n - start))
        ]
        yield orjson.dumps({"jobs": jobs})


async def _submit_batches(bench: Bench, urls: Sequence[str], bodies: Sequence[bytes]) -> list[str]:
    """Send the batches, one client per daemon taking the next; returns every id."""
    ids: list[str] = []
    pending = iter(bodies)

    async def client(url: str) -> None:
        for body in pending:
            answer = await bench.json("POST", f"{url}/jobs/batch", body)
            ids.extend(answer["ids"])

    async with anyio.create_task_group() as tg:
        for url in urls:
            tg.start_soon(client, url)
    return ids


def span(rows: Sequence[dict[str, bytes | None]]) -> float:
    """Seconds from the first start to the last finish (at least 1 ms: times are in ms)."""
    first = min(_int(row["started_at"]) for row in rows)
    last = max(_int(row["finished_at"]) for row in rows)
    return max(last - first, 1) / 1000


def _int(raw: bytes | None) -> int:
    if raw is None:
        raise BenchError("a job record lacks a time it should have; was it deleted?")
    return int(raw)


def _result(raw: bytes | None) -> bytes:
    if raw is None:
        raise BenchError("a job record lacks the result it should have; was it deleted?")
    return raw
