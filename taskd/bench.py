"""`taskd bench`: intake, pick-up, throughput and concurrency, measured on a throwaway setup."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import redis.asyncio as aioredis
from redis.utils import HIREDIS_AVAILABLE

from taskd.embedded import EmbeddedRedisError, RedisServer, _child_setup
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Keys, Store

QUEUE = "default"
PREFIX = "taskd"
# Jobs per round of each workload: (full, --quick). The order is the order they run in.
SIZES = {
    "intake-single": (20_000, 500),
    "intake-batch": (200_000, 5_000),
    "drain": (50_000, 2_000),
    "pickup": (1_000, 100),
    "concurrency": (10_000, 500),
    "mixed": (100_000, 3_000),
}
# Opt-in workloads: they run only when --only names them.
OPT_IN = ("soak",)
# What --url can run: these need no daemon of our own and no access to its Redis.
REMOTE_WORKLOADS = ("intake-single", "intake-batch", "pickup")
HANDLERS = {
    "noop": 'builtin = "noop"',
    "sleep": 'builtin = "sleep"',
    "stamp": f'python = "{__name__}:stamp"',
}
SINGLE_CLIENTS = 16
BATCH_CLIENTS = 4
BATCH_SIZE = 1_000
PICKUP_RATE = 200.0  # jobs/s
PICKUP_WARMUP = 5
MIXED_DAEMONS = 3
MIXED_SLEEP_MAX = 0.005  # s
READ_CHUNK = 5_000  # HMGETs per pipeline when reading job records back
POLL = 0.05  # s, between looks at Redis while waiting, and between INFO clients samples
START_DEADLINE = 30.0  # s for a daemon to answer /health: generous on a loaded machine
STOP_DEADLINE = 15.0  # s for daemons to exit after SIGTERM (drain and requeue) before SIGKILL
START_ATTEMPTS = 3  # the free port we pick may be taken before the daemon binds it
HTTP_TIMEOUT = 120.0
IDLE_DEADLINE = 300.0  # s a --url daemon gets to run the jobs left before pickup starts
JSON = {"Content-Type": "application/json"}
PROBE_TYPE = "taskd-bench-probe"
SOAK_SECONDS = (600, 20)  # (full, --quick)
SOAK_RATE = (8_000, 1_000)  # jobs/s, (full, --quick): about half of what drain measures
SOAK_RETENTION = 60  # s, completed and failed: so that finished jobs expire within the run
SOAK_TICK = 0.1  # s between batches at the nominal rate
SOAK_SAMPLE = 10.0  # s between samples (shorter runs take 10 samples)
SOAK_EARLY = 60.0  # s: the "at 1 min" sample (a third of the way into shorter runs)
MIB = 1024 * 1024


class BenchError(Exception):
    """The bench cannot go on; the message says why."""


class HttpError(BenchError):
    def __init__(self, status: int, body: bytes, url: str) -> None:
        super().__init__(f"{url}: {status}: {body[:300].decode(errors='replace')}")
        self.status = status
        self.body = body


async def stamp(job: Job) -> dict[str, int]:
    """The `stamp` handler: when it started, in ns, for the pickup workload."""
    return {"t": time.time_ns()}


# ---------------------------------------------------------------- figures and rounds


@dataclass(frozen=True, slots=True)
class Figure:
    """One number a workload measured in one round."""

    name: str
    unit: str
    value: float


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """How long the soak workload submits jobs, and how fast."""

    seconds: int
    rate: int  # jobs/s


@dataclass(frozen=True, slots=True)
class Result:
    """One figure over all rounds."""

    workload: str
    figure: str
    unit: str
    median: float
    min: float
    max: float
    rounds: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "figure": self.figure,
            "unit": self.unit,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "rounds": list(self.rounds),
        }


def aggregate(workload: str, rounds: Sequence[Sequence[Figure]]) -> list[Result]:
    """One result per figure, in the order first seen: median, min and max over the rounds."""
    values: dict[tuple[str, str], list[float]] = {}
    for figures in rounds:
        for figure in figures:
            values.setdefault((figure.name, figure.unit), []).append(figure.value)
    return [
        Result(workload, name, unit, statistics.median(v), min(v), max(v), tuple(v))
        for (name, unit), v in values.items()
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank, as /stats computes its percentiles."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_figures(latencies_ms: Sequence[float]) -> list[Figure]:
    return [
        Figure("p50", "ms", percentile(latencies_ms, 0.50)),
        Figure("p99", "ms", percentile(latencies_ms, 0.99)),
        Figure("max", "ms", max(latencies_ms)),
    ]


# ---------------------------------------------------------------- what workloads run on


@dataclass
class Daemon:
    """A daemon process the bench started."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(cannot read {self.log}: {exc})"
        return f"last lines of {self.log}:\n" + "\n".join(text)


class Local:
    """The bench's own Redis, and the daemons the bench starts on it."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.keys = Keys(PREFIX)
        self.redis = aioredis.Redis.from_url(redis_url)
        self.store = Store.from_url(redis_url, prefix=PREFIX)
        self.running: list[Daemon] = []
        self._spawned = 0

    async def close(self) -> None:
        await self.redis.aclose()
        await self.store.close()

    async def finished(self) -> tuple[int, int]:
        """How many jobs completed and how many failed for good."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.completed(QUEUE))
            pipe.zcard(self.keys.failed(QUEUE))
            completed, failed = await pipe.execute()
        return int(completed), int(failed)

    async def enqueue(self, count: int, job_type: str, payload: Any) -> list[str]:
        """Put `count` jobs straight into Redis (no daemon needed); returns their ids."""
        jobs = [
            Job(new_id(), job_type, QUEUE, payload, QUEUED, 0, now_ms(), max_attempts=1)
            for _ in range(count)
        ]
        await self.store.enqueue_many(jobs)
        return [job.id for job in jobs]

    async def records(self, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """These fields of these jobs, read with pipelined HMGETs, a chunk at a time."""
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), READ_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids[start : start + READ_CHUNK]:
                    pipe.hmget(self.keys.job(QUEUE, job_id), list(fields))
                replies: list[list[bytes | None]] = await pipe.execute()
            rows += [dict(zip(fields, reply, strict=True)) for reply in replies]
        return rows

    def spawn(self, concurrency: int, extra: str = "") -> Daemon:
        """Start one daemon process on a free port, `extra` TOML added to its config; it is
        not ready yet."""
        self._spawned += 1
        name = f"daemon-{self._spawned}"
        port = _free_port()
        config = self.tmp / f"{name}.toml"
        config.write_text(_config_text(port, concurrency) + extra)
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskd", "--config", str(config), "--log-level", "warning"],
                cwd=self.tmp,
                env={**os.environ, "TASKD_REDIS_URL": self.redis_url},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # As for the embedded Redis: its own session, so that a Ctrl-C reaches only
                # the bench, which stops it in order; and SIGTERM should the bench die.
                preexec_fn=_child_setup(),
            )
        return Daemon(f"http://127.0.0.1:{port}", proc, log)


def _config_text(port: int, concurrency: int) -> str:
    handlers = "".join(f"\n[handlers.{name}]\n{line}\n" for name, line in HANDLERS.items())
    return (
        f'[server]\nlisten = "127.0.0.1:{port}"\n\n'
        f"[workers]\nconcurrency = {concurrency}\nshutdown_timeout = 1\n{handlers}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Bench:
    """What a workload runs against: an HTTP session, and the bench's own Redis and
    daemons (`local`), or a running daemon at `url`."""

    session: aiohttp.ClientSession
    quick: bool
    local: Local | None = None
    url: str | None = None
    notes: list[str] = field(default_factory=list)
    soak: SoakPlan = field(default_factory=lambda: SoakPlan(SOAK_SECONDS[0], SOAK_RATE[0]))

    def size(self, workload: str) -> int:
        full, quick = SIZES[workload]
        return quick if self.quick else full

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def need_local(self) -> Local:
        if self.local is None:
            raise BenchError("this workload needs daemons of its own; it cannot run with --url")
        return self.local

    async def reset(self) -> None:
        """A clean state between rounds: empty the bench's own Redis (never a --url one)."""
        if self.local is not None:
            await self.local.redis.flushall()

    async def call(self, method: str, url: str, body: bytes | None = None) -> bytes:
        """One request; the body of a 2xx answer, else HttpError."""
        try:
            async with self.session.request(method, url, data=body, headers=JSON) as response:
                answer = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BenchError(f"{method} {url} failed: {exc!r}") from None
        if response.status >= 300:
            raise HttpError(response.status, answer, f"{method} {url}")
        return answer

    async def json(self, method: str, url: str, body: bytes | None = None) -> Any:
        return orjson.loads(await self.call(method, url, body))

    @asynccontextmanager
    async def intake(self) -> AsyncIterator[str]:
        """The daemon to submit to: the one at --url, else a fresh one of our own."""
        if self.url is not None:
            yield self.url
            return
        async with self.daemons(1, concurrency=100) as [daemon]:
            yield daemon.url

    @asynccontextmanager
    async def daemons(
        self, count: int, *, concurrency: int, extra: str = ""
    ) -> AsyncIterator[list[Daemon]]:
        """`count` daemons on the bench's Redis (`extra` TOML added to their config), ready;
        stopped (SIGTERM, then SIGKILL) after."""
        local = self.need_local()
        started: list[Daemon] = []
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(self._start, started, concurrency, extra)
            local.running = started
            yield started
        finally:
            local.running = []
            with anyio.CancelScope(shield=True):
                await _stop(started)

    async def _start(self, started: list[Daemon], concurrency: int, extra: str) -> None:
        local = self.need_local()
        for attempt in range(1, START_ATTEMPTS + 1):
            daemon = local.spawn(concurrency, extra)
            started.append(daemon)
            if await self._ready(daemon):
                return
            if attempt == START_ATTEMPTS:
                raise BenchError(f"a daemon exited while starting\n{daemon.tail()}")

    async def _ready(self, daemon: Daemon) -> bool:
        """Wait for /health to answer 200: True; False if the daemon exited first."""
        deadline = time.monotonic() + START_DEADLINE
        while daemon.proc.poll() is None:
            try:
                async with self.session.get(f"{daemon.url}/health") as response:
                    if response.status == 200:
                        return True
            except aiohttp.ClientError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise BenchError(f"a daemon did not get healthy in {START_DEADLINE:g} s")
            await anyio.sleep(POLL)
        return False

    async def wait_finished(self, count: int) -> None:
        """Until `count` jobs completed; fails at once if a job failed or a daemon died."""
        local = self.need_local()
        # Only against a hang: the slowest plausible run is far inside it.
        deadline = time.monotonic() + 60 + count / 100
        while True:
            completed, failed = await local.finished()
            if failed:
                # The logs go with the temp directory: show them now.
                tails = "\n".join(d.tail(5) for d in local.running)
                raise BenchError(f"{failed} job(s) failed\n{tails}")
            if completed >= count:
                return
            for daemon in local.running:
                if daemon.proc.poll() is not None:
                    raise BenchError(f"a daemon exited ({daemon.proc.returncode})\n{daemon.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"only {completed} of {count} jobs completed in time")
            await anyio.sleep(POLL)


async def _stop(daemons: Sequence[Daemon]) -> None:
    """SIGTERM every daemon, then wait for all; SIGKILL those still there at the deadline."""
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
    for _ in range(int(STOP_DEADLINE / POLL)):
        if all(daemon.proc.poll() is not None for daemon in daemons):
            break
        await anyio.sleep(POLL)
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


# ---------------------------------------------------------------- the workloads


async def intake_single(bench: Bench) -> list[Figure]:
    """POST /jobs, one noop job per request, from 16 keep-alive clients: jobs/s accepted."""
    n = bench.size("intake-single")
    body = orjson.dumps({"type": "noop"})
    async with bench.intake() as url, _paused(bench, url):
        started = time.perf_counter()
        await _clients(SINGLE_CLIENTS, n, lambda: bench.call("POST", f"{url}/jobs", body))
        elapsed = time.perf_counter() - started
    return [Figure("accepted", "jobs/s", n / elapsed)]


async def intake_batch(bench: Bench) -> list[Figure]:
    """POST /jobs/batch, 1,000 noop jobs per request, from 4 clients: jobs/s accepted."""
    n = bench.size("intake-batch")
    body = orjson.dumps({"jobs": [{"type": "noop"}] * BATCH_SIZE})
    requests = math.ceil(n / BATCH_SIZE)
    async with bench.intake() as url, _paused(bench, url):
        started = time.perf_counter()
        await _clients(
            BATCH_CLIENTS, requests, lambda: bench.call("POST", f"{url}/jobs/batch", body)
        )
        elapsed = time.perf_counter() - started
    return [Figure("accepted", "jobs/s", requests * BATCH_SIZE / elapsed)]


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
async def _paused(bench: Bench, url: str) -> AsyncIterator[None]:
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
    async with bench.daemons(1, concurrency=100):
        await bench.wait_finished(n)
    rows = await local.records(ids, ("started_at", "finished_at"))
    return [Figure("throughput", "jobs/s", n / _span(rows))]


async def pickup(bench: Bench) -> list[Figure]:
    """An idle daemon, jobs arriving one at a time at 200/s: from enqueue to handler start."""
    if bench.local is None:
        return await _pickup_remote(bench)
    local = bench.local
    n = bench.size("pickup")
    async with bench.daemons(1, concurrency=100):
        # A few jobs first, so that connections and scripts are warm and the daemon idles.
        await _paced_enqueue(local.store, PICKUP_WARMUP)
        await bench.wait_finished(PICKUP_WARMUP)
        sent = await _paced_enqueue(local.store, n)
        await bench.wait_finished(PICKUP_WARMUP + n)
    rows = await local.records([job_id for job_id, _ in sent], ("result",))
    stamps = [orjson.loads(row["result"])["t"] for row in rows]
    return latency_figures([(t - t0) / 1e6 for (_, t0), t in zip(sent, stamps, strict=True)])


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


async def _pickup_remote(bench: Bench) -> list[Figure]:
    """Pickup through a daemon's HTTP API alone: its `stamp` handler if it has one."""
    assert bench.url is not None
    url, n = bench.url, bench.size("pickup")
    use_stamp = "stamp" in await _configured_types(bench, url)
    body = orjson.dumps({"type": "stamp" if use_stamp else "noop"})
    await _wait_idle(bench, url)
    sent: list[tuple[str, int]] = []
    begin = anyio.current_time()
    for i in range(n):
        await anyio.sleep_until(begin + i / PICKUP_RATE)
        t0 = time.time_ns()
        job = await bench.json("POST", f"{url}/jobs", body)
        sent.append((str(job["id"]), t0))
    jobs = await _finished_jobs(bench, url, [job_id for job_id, _ in sent])
    if use_stamp:
        bench.note(
            "pickup (--url): from sending POST /jobs to the stamp handler starting, the HTTP "
            "request included; assumes the daemon's clock is this machine's"
        )
        return latency_figures(
            [(job["result"]["t"] - t0) / 1e6 for (_, t0), job in zip(sent, jobs, strict=True)]
        )
    bench.note(
        'pickup (--url): the daemon has no `stamp` handler (python = "taskd.bench:stamp"), so '
        "latency is started_at - created_at of the job records, at millisecond resolution"
    )
    return latency_figures([_ms_between(job["created_at"], job["started_at"]) for job in jobs])


async def _wait_idle(bench: Bench, url: str) -> None:
    """Until no job waits or runs: else pickup would measure the backlog (the intake
    workloads leave thousands of jobs behind). A daemon that stays busy gets a note."""
    deadline = time.monotonic() + IDLE_DEADLINE
    while time.monotonic() < deadline:
        queues = (await bench.json("GET", f"{url}/stats")).get("queues", {})
        if not sum(q.get("queued", 0) + q.get("active", 0) for q in queues.values()):
            return
        await anyio.sleep(POLL * 10)
    bench.note(f"pickup (--url): the daemon was still busy after {IDLE_DEADLINE:g} s of waiting")


async def _configured_types(bench: Bench, url: str) -> set[str]:
    """The daemon's job types, from its answer to a job of a type it does not know.

    Nothing is enqueued: the job is refused whole.
    """
    try:
        await bench.call("POST", f"{url}/jobs", orjson.dumps({"type": PROBE_TYPE}))
    except HttpError as exc:
        error = orjson.loads(exc.body).get("error", {}) if exc.status == 422 else {}
        if error.get("code") == "unknown_type":
            _, _, known = str(error["message"]).partition("configured types: ")
            return {name.strip() for name in known.split(",")}
        raise
    raise BenchError(f"{url} accepted a job of type {PROBE_TYPE!r}; is it a taskd daemon?")


async def _finished_jobs(bench: Bench, url: str, ids: Sequence[str]) -> list[dict[str, Any]]:
    """GET each job until it completed, 16 at a time; in the order of `ids`."""
    found: dict[str, dict[str, Any]] = {}
    pending = iter(ids)

    async def fetch() -> None:
        for job_id in pending:
            deadline = time.monotonic() + 60
            while (job := await bench.json("GET", f"{url}/jobs/{job_id}"))["state"] != "completed":
                if job["state"] in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise BenchError(f"job {job_id} did not complete: {job['state']}")
                await anyio.sleep(POLL)
            found[job_id] = job

    async with anyio.create_task_group() as tg:
        for _ in range(SINGLE_CLIENTS):
            tg.start_soon(fetch)
    return [found[job_id] for job_id in ids]


def _ms_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds() * 1e3


async def concurrency(bench: Bench) -> list[Figure]:
    """N jobs sleeping 1 s, one daemon with N slots: wall time, its peak RSS, Redis connections."""
    local = bench.need_local()
    n = bench.size("concurrency")
    ids = await local.enqueue(n, "sleep", {"seconds": 1})
    async with _connections(local) as connections, bench.daemons(1, concurrency=n) as [daemon]:
        await bench.wait_finished(n)
        rss = _peak_rss_mib(daemon.proc.pid)
    rows = await local.records(ids, ("started_at", "finished_at"))
    bench.note(
        "concurrency: Redis connections are the peak of INFO clients connected_clients, less "
        f"the bench's own ({connections.own}, counted before the daemon started)"
    )
    figures = [Figure("wall time", "s", _span(rows))]
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
    # A connection of its own, so the bench's count stays the same while it polls.
    client = aioredis.Redis.from_url(local.redis_url, single_connection_client=True)
    try:
        seen.own = seen.peak = int((await client.info("clients"))["connected_clients"])

        async def sample() -> None:
            while True:
                info = await client.info("clients")
                seen.peak = max(seen.peak, int(info["connected_clients"]))
                await anyio.sleep(POLL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            yield seen
            tg.cancel_scope.cancel()
    finally:
        await client.aclose()


def _peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a live process, in MiB; None where /proc does not tell."""
    return _status_mib(pid, "VmHWM")


def _status_mib(pid: int, name: str) -> float | None:
    """A size (in kB) from /proc/PID/status of a live process, in MiB; None where /proc
    does not tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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
        Figure("throughput", "jobs/s", n / _span(rows)),
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


def _span(rows: Sequence[dict[str, Any]]) -> float:
    """Seconds from the first start to the last finish (at least 1 ms: times are in ms)."""
    first = min(_int(row["started_at"]) for row in rows)
    last = max(_int(row["finished_at"]) for row in rows)
    return max(last - first, 1) / 1000


def _int(raw: bytes | None) -> int:
    if raw is None:
        raise BenchError("a job record lacks a time it should have; was it deleted?")
    return int(raw)


SOAK_CONFIG = f"\n[retention]\ncompleted = {SOAK_RETENTION}\nfailed = {SOAK_RETENTION}\n"


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the soak: the daemon's RSS, Redis memory and keys, the queue's backlog."""

    t: float  # s since the soak started
    rss: float | None  # MiB, VmRSS; None where /proc does not tell
    redis: float  # MiB, INFO memory used_memory
    keys: int  # DBSIZE
    queued: int  # /stats


async def soak(bench: Bench) -> list[Figure]:
    """One daemon (100 slots, retention 60 s), noop jobs POSTed at a steady rate for minutes:
    its RSS, Redis memory and key count, sampled, should stay flat once retention deletes."""
    plan = bench.soak
    submitter = _Submitter(bench, plan.rate)
    async with bench.daemons(1, concurrency=100, extra=SOAK_CONFIG) as [daemon]:
        begin = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(submitter.run, daemon.url, begin, begin + plan.seconds)
            samples = await _soak_samples(bench, daemon, begin, plan.seconds, submitter)
    _soak_notes(bench, plan, submitter, samples)
    return [
        Figure("submitted", "jobs", submitter.sent),
        Figure("submit rate", "jobs/s", submitter.sent / plan.seconds),
        *_soak_figures(samples, plan.seconds),
        Figure("max backlog", "jobs", max(s.queued for s in samples)),
    ]


@dataclass
class _Submitter:
    """POST /jobs/batch of noop jobs on a fixed schedule: a batch every `tick` seconds. Late,
    it catches up, but with at most one extra batch at once; batches further behind are
    skipped (and counted), so the daemon never gets a burst."""

    bench: Bench
    rate: int
    size: int = 0
    sent: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.size = min(BATCH_SIZE, math.ceil(self.rate * SOAK_TICK))

    @property
    def tick(self) -> float:
        return self.size / self.rate

    async def run(self, url: str, begin: float, end: float) -> None:
        body = orjson.dumps({"jobs": [{"type": "noop"}] * self.size})
        slot = 0
        while begin + slot * self.tick < end:
            await anyio.sleep_until(begin + slot * self.tick)
            await self.bench.call("POST", f"{url}/jobs/batch", body)
            self.sent += self.size
            due = int((anyio.current_time() - begin) / self.tick)  # the latest slot due
            following = max(slot + 1, due - 1)
            self.skipped += following - slot - 1
            slot = following


async def _soak_samples(
    bench: Bench, daemon: Daemon, begin: float, seconds: int, submitter: _Submitter
) -> list[Sample]:
    """A sample every SOAK_SAMPLE seconds (10 in all for short runs), the last at the end."""
    interval = min(SOAK_SAMPLE, seconds / 10)
    samples: list[Sample] = []
    for k in range(1, round(seconds / interval) + 1):
        await anyio.sleep_until(begin + k * interval)
        if daemon.proc.poll() is not None:
            raise BenchError(f"the daemon exited ({daemon.proc.returncode})\n{daemon.tail()}")
        sample = await _sample(bench, daemon, k * interval)
        samples.append(sample)
        rss = "?" if sample.rss is None else f"{sample.rss:.1f}"
        print(
            f"soak {sample.t:5.0f} s: RSS {rss} MiB, Redis {sample.redis:.1f} MiB, "
            f"{sample.keys:,} keys, {sample.queued:,} queued, {submitter.sent:,} submitted",
            file=sys.stderr,
            flush=True,
        )
    return samples


async def _sample(bench: Bench, daemon: Daemon, t: float) -> Sample:
    local = bench.need_local()
    async with local.redis.pipeline(transaction=False) as pipe:
        pipe.info("memory")
        pipe.dbsize()
        memory, keys = await pipe.execute()
    stats = await bench.json("GET", f"{daemon.url}/stats")
    queued = int(stats.get("queues", {}).get(QUEUE, {}).get("queued", 0))
    rss = _status_mib(daemon.proc.pid, "VmRSS")
    return Sample(t, rss, int(memory["used_memory"]) / MIB, int(keys), queued)


def _soak_series(samples: Sequence[Sample]) -> list[tuple[str, str, list[float]]]:
    """(name, unit, values) of each series that grows if something leaks."""
    series = [
        ("Redis memory", "MiB", [s.redis for s in samples]),
        ("keys", "keys", [float(s.keys) for s in samples]),
    ]
    rss = [s.rss for s in samples if s.rss is not None]
    if len(rss) == len(samples):
        series.insert(0, ("daemon RSS", "MiB", rss))
    return series


def _soak_figures(samples: Sequence[Sample], seconds: int) -> list[Figure]:
    """Per series: at 1 min, at the end, and its growth from the middle to the last third."""
    early = max(i for i, s in enumerate(samples) if s.t <= min(SOAK_EARLY, seconds / 3) + 1e-6)
    figures: list[Figure] = []
    for name, unit, values in _soak_series(samples):
        figures += [
            Figure(f"{name} at 1 min", unit, values[early]),
            Figure(f"{name} at end", unit, values[-1]),
            Figure(f"{name} growth", "%", growth(values)),
        ]
    return figures


def growth(values: Sequence[float]) -> float:
    """(mean of the last third - mean of the middle third) / mean of the middle third, in %."""
    third = len(values) // 3
    if third == 0:
        return 0.0
    middle = statistics.fmean(values[third : 2 * third])
    last = statistics.fmean(values[len(values) - third :])
    return (last - middle) / middle * 100 if middle else 0.0


def _soak_notes(
    bench: Bench, plan: SoakPlan, submitter: _Submitter, samples: Sequence[Sample]
) -> None:
    every = f"every {samples[0].t:g} s"
    bench.note(
        f"soak: one daemon (100 slots), [retention] completed and failed {SOAK_RETENTION} s, "
        f"noop jobs in batches of {submitter.size:,} every {submitter.tick * 1e3:g} ms "
        f"({plan.rate:,}/s) for {plan.seconds:,} s; sampled {every}; growth: last third of the "
        "samples against the middle third"
    )
    bench.note(
        f"soak: samples fall as a batch arrives, so a backlog of up to one batch "
        f"({submitter.size:,}) means the daemon keeps up; keys and Redis memory swing by about "
        "10 s of jobs, as the janitor deletes expired ones every 10 s"
    )
    if plan.seconds < 3 * SOAK_EARLY:
        bench.note("soak: in a run under 3 min, 'at 1 min' is a third of the way in")
    if submitter.skipped:
        bench.note(
            f"soak: the submitter fell behind and skipped {submitter.skipped:,} batches "
            f"({submitter.skipped * submitter.size:,} jobs): see the submit rate"
        )
    for name, unit, values in _soak_series(samples):
        bench.note(f"soak {name} ({unit}), {every}: {' '.join(_short(v) for v in values)}")
    bench.note(f"soak queued, {every}: {' '.join(str(s.queued) for s in samples)}")


def _short(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


Workload = Callable[[Bench], Awaitable[list[Figure]]]
WORKLOADS: dict[str, Workload] = {
    "intake-single": intake_single,
    "intake-batch": intake_batch,
    "drain": drain,
    "pickup": pickup,
    "concurrency": concurrency,
    "mixed": mixed,
    "soak": soak,
}


# ---------------------------------------------------------------- running and reporting


@dataclass(frozen=True, slots=True)
class Options:
    quick: bool
    as_json: bool
    rounds: int
    workloads: tuple[str, ...]
    url: str | None
    soak: SoakPlan


@dataclass
class Report:
    machine: dict[str, Any]
    results: list[Result]
    notes: list[str]


async def run_rounds(bench: Bench, options: Options) -> list[Result]:
    """Each workload `rounds` times from a clean state, aggregated per figure."""
    results: list[Result] = []
    for name in options.workloads:
        rounds: list[list[Figure]] = []
        for number in range(1, options.rounds + 1):
            await bench.reset()
            figures = await WORKLOADS[name](bench)
            said = ", ".join(f"{f.name} {_number(f.value)} {f.unit}" for f in figures)
            print(f"{name} round {number}/{options.rounds}: {said}", file=sys.stderr, flush=True)
            rounds.append(figures)
        results += aggregate(name, rounds)
    return results


def run(options: Options) -> Report:
    """Run the bench: against --url, or on a throwaway Redis that is always stopped after."""
    backend = {"use_uvloop": True}
    if options.url is not None:
        return anyio.run(_remote, options, backend="asyncio", backend_options=backend)
    with tempfile.TemporaryDirectory(prefix="taskd-bench-") as tmp:
        server = _start_redis(Path(tmp) / "redis")
        try:
            return anyio.run(
                _local, options, server.url, Path(tmp), backend="asyncio", backend_options=backend
            )
        finally:
            server.stop()


def _start_redis(data_dir: Path) -> RedisServer:
    for attempt in range(1, START_ATTEMPTS + 1):
        server = RedisServer(data_dir=data_dir, port=_free_port(), appendonly=False)
        try:
            server.start(timeout=30)
            return server
        except EmbeddedRedisError as exc:
            # Most likely another process took the free port first: try another.
            if attempt == START_ATTEMPTS:
                raise BenchError(f"cannot start a Redis for the bench: {exc}") from exc
    raise AssertionError("unreachable")


async def _local(options: Options, redis_url: str, tmp: Path) -> Report:
    local = Local(redis_url, tmp)
    try:
        async with _session() as session:
            bench = Bench(session, options.quick, local=local, soak=options.soak)
            redis_version = str((await local.redis.info("server"))["redis_version"])
            results = await run_rounds(bench, options)
    finally:
        with anyio.CancelScope(shield=True):
            await local.close()
    return Report(_machine(redis_version), results, bench.notes)


async def _remote(options: Options) -> Report:
    assert options.url is not None
    url = options.url.rstrip("/")
    async with _session(url) as session:
        base = "http://localhost" if url.startswith("unix:") else url
        bench = Bench(session, options.quick, url=base)
        stats = await bench.json("GET", f"{base}/stats")
        if "noop" not in await _configured_types(bench, base):
            raise BenchError(f"the daemon at {url} has no `noop` handler; the bench needs one")
        bench.note(f"daemon at {url}; the machine above is the one the bench ran on")
        results = await run_rounds(bench, options)
    redis_version = str(stats.get("redis", {}).get("version"))
    return Report(_machine(redis_version), results, bench.notes)


@asynccontextmanager
async def _session(url: str = "") -> AsyncIterator[aiohttp.ClientSession]:
    """Keep-alive connections, enough for every client; a unix socket for unix:/PATH."""
    connector: aiohttp.BaseConnector
    if url.startswith("unix:"):
        connector = aiohttp.UnixConnector(url.removeprefix("unix:"), limit=64)
    else:
        connector = aiohttp.TCPConnector(limit=64)
    headers = {}
    if token := os.environ.get("TASKD_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as s:
        yield s


def _machine(redis_version: str) -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis": redis_version,
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "redis_parser": "hiredis" if HIREDIS_AVAILABLE else "python",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def render(report: Report, options: Options) -> str:
    """The report as a header line and a table, one row per figure, then the notes."""
    m = report.machine
    sizes = "quick sizes" if options.quick else "full sizes"
    header = (
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Redis {m['redis']}, "
        f"{m['event_loop']}, {m['redis_parser']} parser; {options.rounds} round(s), {sizes}"
    )
    rows = [["WORKLOAD", "FIGURE", "UNIT", "MEDIAN", "MIN", "MAX"]]
    for r in report.results:
        rows.append([r.workload, r.figure, r.unit, *map(_number, (r.median, r.min, r.max))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i >= 3 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    notes = [f"note: {text}" for text in report.notes]
    return "\n".join([header, "", *lines, *([""] if notes else []), *notes])


def _number(value: float) -> str:
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def as_json(report: Report) -> str:
    document = {
        "machine": report.machine,
        "results": [result.to_json() for result in report.results],
        "notes": report.notes,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()


# ---------------------------------------------------------------- the command


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`taskd bench`, for the command line's subcommands."""
    bench = commands.add_parser(
        "bench",
        help="measure intake, pick-up and throughput on a throwaway Redis and daemons",
        description="Start a throwaway Redis and daemons, run the workloads, print the median, "
        "min and max of each figure over the rounds, and clean everything up.",
    )
    bench.add_argument("--quick", action="store_true", help="1 round of tiny sizes (a smoke test)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument(
        "--rounds", type=_positive, metavar="N", help="rounds per workload (default 3; --quick 1)"
    )
    bench.add_argument(
        "--only", nargs="+", choices=list(WORKLOADS), metavar="NAME",
        help=f"run only these workloads: {', '.join(WORKLOADS)} "
        f"({', '.join(OPT_IN)} only when named here)",
    )  # fmt: skip
    bench.add_argument(
        "--soak-seconds", type=_positive, metavar="N",
        help=f"how long soak submits jobs (default {SOAK_SECONDS[0]}; --quick {SOAK_SECONDS[1]})",
    )  # fmt: skip
    bench.add_argument(
        "--soak-rate", type=_positive, metavar="R",
        help=f"jobs/s soak submits (default {SOAK_RATE[0]:,}; --quick {SOAK_RATE[1]:,})",
    )  # fmt: skip
    bench.add_argument(
        "--url",
        help="bench a running daemon instead (http://HOST:PORT or unix:/PATH; "
        f"runs {', '.join(REMOTE_WORKLOADS)} only, with its own handlers; token: $TASKD_TOKEN)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def main(args: argparse.Namespace) -> int:
    """Run `taskd bench`: 0 with the results printed, 1 if it failed, 2 for bad usage."""
    if args.only:
        workloads = tuple(name for name in WORKLOADS if name in args.only)
    else:
        workloads = tuple(name for name in WORKLOADS if name not in OPT_IN)
    if args.url is not None:
        workloads = tuple(name for name in workloads if name in REMOTE_WORKLOADS)
        if args.only and set(args.only) - set(REMOTE_WORKLOADS):
            wrong = ", ".join(sorted(set(args.only) - set(REMOTE_WORKLOADS)))
            print(
                f"taskd bench: with --url only {', '.join(REMOTE_WORKLOADS)} run, not {wrong}",
                file=sys.stderr,
            )
            return 2
    rounds = args.rounds or (1 if args.quick else 3)
    soak = SoakPlan(
        args.soak_seconds or SOAK_SECONDS[args.quick], args.soak_rate or SOAK_RATE[args.quick]
    )
    options = Options(args.quick, args.json, rounds, workloads, args.url, soak)
    try:
        report = run(options)
    except KeyboardInterrupt:
        print("taskd bench: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    except (BenchError, BaseExceptionGroup) as exc:
        error = _bench_error(exc)
        if error is None:
            raise
        print(f"taskd bench: {error}", file=sys.stderr)
        return 1
    print(as_json(report) if options.as_json else render(report, options))
    return 0


def _bench_error(exc: BaseException) -> BenchError | None:
    """The BenchError behind `exc`, which task groups wrap in exception groups; None when
    something else (a bug) is in there too, which must not be hidden."""
    if isinstance(exc, BenchError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        errors, rest = exc.split(BenchError)
        if errors is not None and rest is None:
            return _bench_error(errors.exceptions[0])
    return None
