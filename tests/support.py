"""Test helpers: configs, daemons run in-process or as real processes, polling with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from taskd.config import Config, parse
from taskd.daemon import Daemon, connect, open_archive
from taskd.egress import Policy
from taskd.handlers import Handlers
from taskd.signing import Signer
from taskd.store import Keys, TypeLimits
from taskd.store.record import id_text

if TYPE_CHECKING:  # opentelemetry, which it imports, is the optional otel extra
    from taskd.tracing import Tracing

REPO = Path(__file__).resolve().parent.parent
# The console script pip installed next to this interpreter: what the README runs.
TASKD = Path(sys.executable).parent / "taskd"

# A session to a daemon, and the daemon's base URL.
Api = tuple[aiohttp.ClientSession, str]
# The conftest `daemon_api` fixture: `async with daemon_api(**sections) as (daemon, api)`.
DaemonApi = Callable[..., AbstractAsyncContextManager[tuple[Daemon, Api]]]

# Generous: a loaded 2-core CI machine can stall a process for seconds.
DEADLINE = 20.0

BUILTINS = {name: {"builtin": name} for name in ("echo", "noop", "sleep", "fail")}
# For claims made straight through the store: the types it may take, here only "echo".
ECHO = (TypeLimits("echo"),)


def make_config(redis_url: str, **sections: Mapping[str, Any]) -> Config:
    """A config on the test Redis: builtin handlers, intake on a free port, fast heartbeats,
    and callbacks allowed to the test's own endpoints on 127.0.0.1."""
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0"},
        "redis": {"url": redis_url},
        "workers": {
            "concurrency": 10,
            "heartbeat_interval": 0.5,
            "dead_after": 5,
            "shutdown_timeout": 1,
        },
        "handlers": dict(BUILTINS),
        "callbacks": {"allow": ["127.0.0.0/8"]},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse(data, env={})


def base_url(daemon: Daemon) -> str:
    host, port = daemon.api.addresses[0][:2]
    return f"http://{host}:{port}"


@asynccontextmanager
async def running_daemon(config: Config, tracing: Tracing | None = None) -> AsyncIterator[Daemon]:
    """A daemon in this process, started and ready; stopped gracefully on exit. With
    `tracing`, its spans go to that (the config's [tracing] is not read).

    The daemon runs in a task of its own: pytest-asyncio sets fixtures up and tears them
    down in different tasks, and an anyio task group must be left in the task that
    entered it.
    """
    started: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()

    async def serve() -> None:
        store = connect(config, config.redis.url)
        try:
            egress = Policy.from_config(config.callbacks)
            signer = Signer.from_config(config.server)
            async with (
                Handlers(
                    config.handlers, egress=egress, signer=signer, tracing=tracing
                ) as handlers,
                open_archive(config) as archive,
            ):
                daemon = Daemon(
                    config=config, store=store, handlers=handlers, archive=archive, tracing=tracing
                )
                async with anyio.create_task_group() as tg:
                    await tg.start(daemon.run)
                    started.set_result(daemon)
        finally:
            await store.close()

    task = asyncio.create_task(serve())
    done, _ = await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what stopped start-up
    daemon = started.result()
    try:
        yield daemon
    finally:
        daemon.stop()
        await task


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, deadline: float = DEADLINE
) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        await anyio.sleep(0.01)


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def post_json(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


async def wait_for_state(
    session: aiohttp.ClientSession, url: str, job_id: str, states: set[str]
) -> dict[str, Any]:
    """Poll GET /jobs/ID until the job is in one of `states`; return it."""
    job: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal job
        _, job = await get_json(session, f"{url}/jobs/{job_id}")
        return job.get("state") in states

    await wait_until(reached, f"job {job_id} to reach {states}")
    return job


class DaemonProcess:
    """A taskd daemon as a real child process, as a user runs it: `taskd ARGS`, or with
    `shell`, the command line ARGS[0] as bash runs it (which execs its last command)."""

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        shell: bool = False,
    ) -> None:
        self.log = cwd / f"taskd-{len(list(cwd.glob('taskd-*.log')))}.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", *args] if shell else [str(TASKD), *args],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, deadline: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout=deadline)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()

    def children(self) -> list[int]:
        """The pids of the daemon's live child processes (its archiver process, say)."""
        return children_of(self.proc.pid)


def children_of(pid: int) -> list[int]:
    """The pids of a live process's children, from /proc."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread or the process ended meanwhile
            pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def wait_healthy(url: str, process: DaemonProcess) -> None:
    """Wait until the daemon's /health answers 200 (failing early if it exited)."""
    async with aiohttp.ClientSession() as session:

        async def healthy() -> bool:
            if process.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{process.output()}")
            try:
                async with session.get(f"{url}/health") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(healthy, f"{url}/health")


async def index_pages(redis: Redis, queue: str, prefix: str = "taskd") -> list[tuple[str, str]]:
    """Each page of a queue's paged index, in the directory's order: its first id and its
    key."""
    keys = Keys(prefix)
    found = []
    for member in await redis.zrange(keys.pages(queue), 0, -1):
        start, _, number = member.decode().rpartition(":")
        found.append((start, keys.page(queue, int(number))))
    return found


async def indexed_ids(redis: Redis, queue: str, prefix: str = "taskd") -> list[str]:
    """Every id in a queue's index, wherever its layout put it (the sorted set and the
    pages), each as often as it is there."""
    found = [member.decode() for member in await redis.zrange(Keys(prefix).index(queue), 0, -1)]
    for _, page in await index_pages(redis, queue, prefix):
        found += [id_text(raw) for raw in await redis.hkeys(page)]
    return found


async def ready_ids(redis: Redis, queue: str, prefix: str = "taskd") -> list[bytes]:
    """Every ready id of a queue, wherever it waits: the inbox, then each priority's list."""
    found: list[bytes] = []
    for key in Keys(prefix).ready_lists(queue):
        found += await redis.lrange(key, 0, -1)
    return found


@asynccontextmanager
async def two_daemons(
    config: Config,
) -> AsyncIterator[tuple[aiohttp.ClientSession, tuple[Daemon, Daemon], list[str]]]:
    """Two daemons in this process on one Redis, a session, and their base URLs."""
    async with (
        running_daemon(config) as one,
        running_daemon(config) as two,
        aiohttp.ClientSession() as session,
    ):
        yield session, (one, two), [base_url(one), base_url(two)]


async def submit_in_turn(
    session: aiohttp.ClientSession, urls: list[str], body: Mapping[str, Any], count: int
) -> list[str]:
    """Submit `count` jobs of `body`, through each of `urls` in turn; their ids in order."""
    ids = []
    for n in range(count):
        status, job = await post_json(session, f"{urls[n % len(urls)]}/jobs", body)
        assert status == 201, job
        ids.append(str(job["id"]))
    return ids


def children() -> set[int]:
    """This process's child processes, zombies included (each is listed under the thread
    that started it; a thread that ended meanwhile handed its children to another)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie left (PID 1 here need not reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def read_pids(path: Path) -> tuple[int, int]:
    child, grandchild = path.read_text().split()
    return int(child), int(grandchild)


async def fill(redis: Redis) -> None:
    """Write until Redis refuses: past maxmemory, with noeviction, it takes no more writes.

    A large write is refused while a little room is left (its own size counts), and a key
    that expires would give a tiny write that room back: so once the writes are refused,
    maxmemory goes a margin below what Redis holds, and stays full until ballast goes.
    """
    for n in range(2000):
        try:
            await redis.set(f"ballast:{n}", b"x" * 50_000)
        except OutOfMemoryError:
            used = int((await redis.info("memory"))["used_memory"])
            await redis.config_set("maxmemory", used - 256 * 1024)
            with pytest.raises(OutOfMemoryError):
                await redis.set("probe", b"1")
            return
    raise AssertionError("Redis took 100 MB past an 8 MB maxmemory")
