"""A throwaway PostgreSQL server, for the archive's bench and tests: its own cluster on a
free port.

Debian's `postgresql` package provides the binaries (.ci/run installs it for the tests).
initdb and the server refuse to run as root, so as root they run as the `postgres` user
the package creates, on a data directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from taskd.bench.harness import tree_cpu_seconds
from taskd.embedded import free_port


class PostgresServerError(RuntimeError):
    """The server's binaries are missing, or one of them failed."""


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise PostgresServerError(
        "no PostgreSQL server binaries (pg_ctl): install Debian's postgresql package"
    )


class PostgresServer:
    """One PostgreSQL cluster in a directory of its own, trusting local connections;
    start/stop as a test needs (a stopped server keeps its data, as a real outage would);
    remove() deletes it all.

    The directory is made in the system's temporary directory, not pytest's: that one is
    private to root, and the server runs as `postgres`.
    """

    def __init__(self, port: int | None = None) -> None:
        """`port`: the TCP port it listens on once started (None: one free now, which
        another process may take first; the test suite passes one that none will)."""
        self.data_dir = Path(tempfile.mkdtemp(prefix="taskd-test-pg-"))
        self.port = port or free_port()
        self._bin = _bin_dir()
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb", "-D", str(self.data_dir / "db"), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 30.0) -> None:
        # fsync off: a test's data need not survive a power cut, and it is many times faster.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off "
            f"-c unix_socket_directories={self.data_dir}"
        )
        self._run(
            "pg_ctl", "-D", str(self.data_dir / "db"), "-o", options, "-w", "-t",
            str(int(timeout)), "-l", str(self.data_dir / "log"), "start",
        )  # fmt: skip

    @property
    def running(self) -> bool:
        """Whether the server runs (its PID file is there)."""
        return (self.data_dir / "db" / "postmaster.pid").exists()

    def cpu_seconds(self) -> float | None:
        """CPU time the server (its postmaster and every backend) used so far; None
        where /proc does not tell or the server is not running."""
        try:
            pid = int((self.data_dir / "db" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return tree_cpu_seconds(pid)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir / "db"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """Stop at once, as a crash would (immediate mode: no checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data_dir / "db"), "-m", "immediate", "-w", "stop")

    def psql(self, database: str, sql: str) -> str:
        return self._run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql,
        )  # fmt: skip

    def _run(self, program: str, *args: str) -> str:
        command: Sequence[str] = [str(self._bin / program), *args]
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode:
            log = self.data_dir / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise PostgresServerError(f"{program} failed: {done.stderr or done.stdout}\n{tail}")
        return done.stdout


def wait_until_up(server: PostgresServer, timeout: float = 30.0) -> None:
    """Return once the server answers a query."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.psql("postgres", "SELECT 1")
            return
        except PostgresServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
