"""What the workloads run on: the bench's Redis, the daemons and proxies it spawns, its client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import orjson

from taskd.embedded import EmbeddedRedisError, RedisServer, child_setup, free_port
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Inspector, Store
from taskd.store.record import RECORD_VERSION

QUEUE = "default"
PREFIX = "taskd"
# Jobs per round of each workload: (full, --quick). The order is the order they run in.
SIZES = {
    "intake-single": (20_000, 2_000),
    "intake-batch": (200_000, 5_000),
    "drain": (50_000, 2_000),
    "pickup": (1_000, 100),
    "concurrency": (10_000, 500),
    "mixed": (100_000, 3_000),
}
SOAK_SECONDS = (600, 20)  # (full, --quick)
SOAK_RATE = (8_000, 1_000)  # jobs/s, (full, --quick): about half of what drain measures
# The sizes of the workloads SIZES does not size: (full, --quick) each.
OPEN_LOOP_SECONDS = (10, 1)  # s jobs are offered at each load level
OPEN_LOOP_DRAIN = (20_000, 2_000)  # noop jobs drained to measure the maximum rate
IDLE_SECONDS = (20, 3)  # s the idle daemon's commands are counted
MEMORY_JOBS = (1_000_000, 5_000)  # jobs queued to measure Redis bytes per job
RTT_DRAIN = (30_000, 500)  # noop jobs drained at each round trip rtt adds
RTT_INTAKE = (20_000, 1_000)  # noop jobs POSTed at each round trip rtt adds
ARCHIVE_DRAIN = (50_000, 2_000)  # noop jobs drained without, then with, the archive
ARCHIVE_ROWS = (1_000_000, 20_000)  # archived jobs the archive's queries are timed on
# The daemons' handlers; `stamp` is re-exported by the package, so its target stays put.
HANDLERS = {
    "noop": 'builtin = "noop"',
    "sleep": 'builtin = "sleep"',
    "stamp": 'python = "taskd.bench:stamp"',
}
POLL = 0.05  # s, between looks at Redis while waiting, and between INFO clients samples
START_DEADLINE = 30.0  # s for a daemon to answer /health: generous on a loaded machine
STOP_DEADLINE = 15.0  # s for daemons to exit after SIGTERM (drain and requeue) before SIGKILL
START_ATTEMPTS = 3  # the free port we pick may be taken before the daemon binds it
HTTP_TIMEOUT = 120.0
LISTEN_BACKLOG = 128
JSON = {"Content-Type": "application/json"}


class BenchError(Exception):
    """The bench cannot go on; the message says why."""


class HttpError(BenchError):
    def __init__(self, status: int, body: bytes, url: str) -> None:
        super().__init__(f"{url}: {status}: {body[:300].decode(errors='replace')}")
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """How long the soak workload submits jobs, and how fast."""

    seconds: int
    rate: int  # jobs/s


@dataclass(kw_only=True)
class Spawned:
    """A process the bench started: a daemon or aiohttp alone (`url` its HTTP API), or a
    delay proxy (`url` its target's URL with the proxy's address in it)."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(cannot read {self.log}: {exc})"
        return f"last lines of {self.log}:\n" + "\n".join(text)

    def rss_mib(self) -> float | None:
        """VmRSS of the live process, in MiB; None where /proc does not tell."""
        return _status_mib(self.proc.pid, "VmRSS")

    def peak_rss_mib(self) -> float | None:
        """VmHWM of the live process, in MiB; None where /proc does not tell."""
        return _status_mib(self.proc.pid, "VmHWM")

    def cpu_seconds(self) -> float | None:
        """User and system CPU time the live process used so far; None where /proc does
        not tell."""
        return process_cpu_seconds(self.proc.pid)

    def children_cpu_seconds(self) -> float | None:
        """CPU time of the live process's children and theirs (its archiver process, the
        exec handlers it waited for); None where /proc does not tell."""
        return tree_cpu_seconds(self.proc.pid, itself=False)


# Clock ticks per second, the unit of /proc's CPU times.
_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the third on (after the command name, which may hold
    spaces); None where /proc does not tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """User and system CPU time a live process used so far."""
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu_seconds(pid: int, *, itself: bool = True) -> float | None:
    """CPU time of a live process (unless not `itself`) and of its descendants: the live
    ones, and those that ended and were waited for (cutime, cstime)."""
    fields = _stat(pid)
    if fields is None:
        return None
    total = (int(fields[13]) + int(fields[14])) / _TICKS
    if itself:
        total += (int(fields[11]) + int(fields[12])) / _TICKS
    for child in _children(pid):
        total += tree_cpu_seconds(child) or 0.0
    return total


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):  # the thread or process ended meanwhile
            children += map(int, (task / "children").read_text().split())
    return children


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


class Local:
    """The bench's own Redis, and the daemons the bench starts on it."""

    def __init__(self, *, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        # One connection, as a daemon has: the Store puts jobs in, the Inspector reads.
        self.store = Store.from_url(redis_url, prefix=PREFIX)
        # Its jobs' records as a fleet of this taskd writes them, once a heartbeat has found
        # no daemon of an older one (Store.beat): the bench's daemons are all of this one.
        self.store.record_version = RECORD_VERSION
        self.inspector = Inspector(connection=self.store.connection)
        self.running: list[Spawned] = []  # the daemons and proxies in use, that must not die
        self._spawned = 0

    async def close(self) -> None:
        await self.store.close()

    @contextmanager
    def watching(self, spawned: Sequence[Spawned]) -> Iterator[None]:
        """Inside, wait_finished fails at once should one of these processes exit."""
        self.running += spawned
        try:
            yield
        finally:
            self.running = [s for s in self.running if s not in spawned]

    async def finished(self) -> tuple[int, int]:
        """How many jobs completed and how many failed for good."""
        return await self.inspector.finished(QUEUE)

    async def enqueue(self, count: int, job_type: str, payload: Any) -> list[str]:
        """Put `count` jobs straight into Redis (no daemon needed); returns their ids."""
        jobs = [
            Job(new_id(), job_type, QUEUE, payload, QUEUED, 0, now_ms(), max_attempts=1)
            for _ in range(count)
        ]
        await self.store.enqueue_many(jobs)
        return [job.id for job in jobs]

    async def records(
        self, ids: Sequence[str], fields: Sequence[str]
    ) -> list[dict[str, bytes | None]]:
        """These fields of these jobs, raw, in the order of `ids`."""
        return await self.inspector.job_fields(QUEUE, ids, fields)

    def spawn(self, concurrency: int, extra: str = "", redis_url: str | None = None) -> Spawned:
        """Start one daemon process on a free port, `extra` TOML added to its config, on the
        bench's Redis or `redis_url`; it is not ready yet."""
        name = self._name("daemon")
        port = free_port()
        config = self.tmp / f"{name}.toml"
        config.write_text(_config_text(port, concurrency) + extra)
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskd", "--config", str(config), "--log-level", "warning"],
                cwd=self.tmp,
                env={**os.environ, "TASKD_REDIS_URL": redis_url or self.redis_url},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # As for the embedded Redis: its own session, so that a Ctrl-C reaches only
                # the bench, which stops it in order; and SIGTERM should the bench die.
                preexec_fn=child_setup(),
            )
        return Spawned(url=f"http://127.0.0.1:{port}", proc=proc, log=log)

    def spawn_proxy(self, rtt_ms: float) -> Spawned:
        """Start a delay proxy in front of the bench's Redis; it accepts connections at once."""
        return spawn_delay_proxy(
            target_url=self.redis_url, rtt_ms=rtt_ms, log=self.tmp / f"{self._name('delay')}.log"
        )

    def spawn_floor(self) -> Spawned:
        """Start the intake's floor (taskd.bench.floor); it accepts connections at once."""
        return spawn_floor(self.tmp / f"{self._name('floor')}.log")

    def _name(self, kind: str) -> str:
        self._spawned += 1
        return f"{kind}-{self._spawned}"


def spawn_delay_proxy(
    *, target_url: str, rtt_ms: float, log: Path, timers: str | None = None
) -> Spawned:
    """Start taskd.bench.delay in front of target_url's host and port, adding `rtt_ms` to
    the round trip (`timers`: its --timers, if not its default)."""
    target = urlsplit(target_url)
    arguments = [
        "--target", f"{target.hostname}:{target.port}",
        "--rtt-ms", f"{rtt_ms:g}",
        *(["--timers", timers] if timers else []),
    ]  # fmt: skip
    proxy = _spawn_listening("taskd.bench.delay", arguments, log)
    return Spawned(url=target._replace(netloc=proxy.url).geturl(), proc=proxy.proc, log=log)


def spawn_floor(log: Path) -> Spawned:
    """Start taskd.bench.floor, aiohttp alone answering POST /jobs; its URL in `url`."""
    floor = _spawn_listening("taskd.bench.floor", [], log)
    return Spawned(url=f"http://{floor.url}", proc=floor.proc, log=log)


def _spawn_listening(module: str, arguments: list[str], log: Path) -> Spawned:
    """Start `python -m module --listen-fd N arguments` (`url`: the HOST:PORT it listens
    on). Its listening socket is bound here and handed over, so there is no race for a
    free port and connections wait in its backlog until it accepts them."""
    with socket.create_server(("127.0.0.1", 0), backlog=LISTEN_BACKLOG) as listener:
        command = [
            sys.executable, "-m", module, "--listen-fd", str(listener.fileno()), *arguments,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=log.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
                preexec_fn=child_setup(),  # as the daemons', see Local.spawn
            )
        address = f"127.0.0.1:{listener.getsockname()[1]}"
    return Spawned(url=address, proc=proc, log=log)


def _config_text(port: int, concurrency: int) -> str:
    handlers = "".join(f"\n[handlers.{name}]\n{line}\n" for name, line in HANDLERS.items())
    return (
        f'[server]\nlisten = "127.0.0.1:{port}"\n\n'
        f"[workers]\nconcurrency = {concurrency}\nshutdown_timeout = 1\n{handlers}"
    )


@contextmanager
def own_redis(data_dir: Path) -> Iterator[str]:
    """A throwaway Redis on a free port, its URL inside; always stopped after."""
    server = _start_redis(data_dir)
    try:
        yield server.url
    finally:
        server.stop()


def _start_redis(data_dir: Path) -> RedisServer:
    try:
        return RedisServer.start_on_free_port(
            data_dir=data_dir, timeout=30, attempts=START_ATTEMPTS, appendonly=False
        )
    except EmbeddedRedisError as exc:
        raise BenchError(f"cannot start a Redis for the bench: {exc}") from exc


@asynccontextmanager
async def http_session(url: str = "") -> AsyncIterator[aiohttp.ClientSession]:
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


@dataclass(kw_only=True)
class Bench:
    """What a workload runs against: an HTTP session, and the bench's own Redis and
    daemons (`local`), or a running daemon at `url`."""

    session: aiohttp.ClientSession
    quick: bool
    local: Local | None = None
    url: str | None = None
    unix_url: str | None = None  # --url's unix:/PATH, which `url` names http://localhost
    notes: list[str] = field(default_factory=list)
    soak: SoakPlan = field(default_factory=lambda: SoakPlan(SOAK_SECONDS[0], SOAK_RATE[0]))

    def size(self, workload: str) -> int:
        return self.scaled(SIZES[workload])

    def scaled(self, sizes: tuple[int, int]) -> int:
        """The full size or the --quick one, of (full, quick)."""
        full, quick = sizes
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
            await self.local.store.flush_all()

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
        self, count: int, *, concurrency: int, extra: str = "", redis_url: str | None = None
    ) -> AsyncIterator[list[Spawned]]:
        """`count` daemons on the bench's Redis, or `redis_url` (`extra` TOML added to their
        config), ready; stopped (SIGTERM, then SIGKILL) after."""
        local = self.need_local()
        started: list[Spawned] = []
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(self._start, started, concurrency, extra, redis_url)
            with local.watching(started):
                yield started
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(started)

    @asynccontextmanager
    async def delay_proxy(self, rtt_ms: float) -> AsyncIterator[Spawned]:
        """A delay proxy in front of the bench's Redis, adding `rtt_ms` to the round trip;
        stopped after (before the bench's Redis, after the daemons using it)."""
        async with self._watched(self.need_local().spawn_proxy(rtt_ms)) as proxy:
            yield proxy

    @asynccontextmanager
    async def floor(self) -> AsyncIterator[Spawned]:
        """The intake's floor (taskd.bench.floor), stopped after."""
        async with self._watched(self.need_local().spawn_floor()) as floor:
            yield floor

    @asynccontextmanager
    async def _watched(self, spawned: Spawned) -> AsyncIterator[Spawned]:
        """`spawned`, watched (wait_finished fails should it exit), and stopped after."""
        try:
            with self.need_local().watching([spawned]):
                yield spawned
        finally:
            with anyio.CancelScope(shield=True):
                await _stop([spawned])

    async def _start(
        self, started: list[Spawned], concurrency: int, extra: str, redis_url: str | None
    ) -> None:
        local = self.need_local()
        for attempt in range(1, START_ATTEMPTS + 1):
            daemon = local.spawn(concurrency, extra, redis_url)
            started.append(daemon)  # stopped with the others, should _ready raise
            if await self._ready(daemon):
                return
            # It exited (its port taken first): nothing to stop, and not one of `count`.
            started.remove(daemon)
            if attempt == START_ATTEMPTS:
                raise BenchError(f"a daemon exited while starting\n{daemon.tail()}")

    async def _ready(self, daemon: Spawned) -> bool:
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
            for spawned in local.running:
                if spawned.proc.poll() is not None:
                    raise BenchError(
                        f"{spawned.log.stem} exited ({spawned.proc.returncode})\n{spawned.tail()}"
                    )
            if time.monotonic() > deadline:
                raise BenchError(f"only {completed} of {count} jobs completed in time")
            await anyio.sleep(POLL)


async def _stop(daemons: Sequence[Spawned]) -> None:
    """SIGTERM every daemon (or proxy), then wait for all; SIGKILL those still there at the
    deadline."""
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
