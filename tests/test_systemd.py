"""The sd_notify protocol against real datagram sockets, and the unit files through systemd."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from taskd.archive import process as archive_process
from taskd.config import ServerConfig, WorkersConfig
from taskd.connections import open_files_needed
from taskd.systemd import Notifier
from taskd.workers import FINISH_TIMEOUT
from tests.support import REPO, wait_until
from tests.test_docs import parse_blocks

UNITS = Path(__file__).resolve().parent.parent / "systemd"
# The console script of the taskd under test, which verify can check is executable.
SCRIPT = Path(sys.executable).parent / "taskd"
# sun_path holds 108 bytes on Linux; pytest's tmp_path can be longer than that.
MAX_SOCKET_PATH = 100


@dataclass
class Receiver:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    sock: socket.socket
    notify_socket: str  # what NOTIFY_SOCKET would say to reach it

    def received(self) -> list[bytes]:
        """Every datagram queued so far, without waiting."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096))
            except BlockingIOError:
                return messages


def _receiver(address: str, notify_socket: str) -> Receiver:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    # A sendto on a unix datagram socket queues the message before it returns, so a
    # non-blocking read right after notify() sees it: no waiting, no races.
    sock.setblocking(False)
    return Receiver(sock, notify_socket)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A receiver on a filesystem path."""
    directory = tmp_path
    if len(os.fsencode(tmp_path / "notify")) > MAX_SOCKET_PATH:
        directory = Path(tempfile.mkdtemp(prefix="sd"))
    path = str(directory / "notify")
    recv = _receiver(path, path)
    yield recv
    recv.sock.close()
    if directory != tmp_path:
        shutil.rmtree(directory)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    """A receiver in the abstract namespace, as NOTIFY_SOCKET=@name names it."""
    name = f"taskd-test-{uuid.uuid4().hex}"
    recv = _receiver("\0" + name, "@" + name)
    yield recv
    recv.sock.close()


def test_ready_stopping_and_status_send_exact_datagrams(receiver: Receiver) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": receiver.notify_socket})
    assert notifier.enabled
    notifier.ready("ready: concurrency 100")
    notifier.status("draining 3 jobs")
    notifier.stopping("stopping")
    assert receiver.received() == [
        b"READY=1\nSTATUS=ready: concurrency 100",
        b"STATUS=draining 3 jobs",
        b"STOPPING=1\nSTATUS=stopping",
    ]


def test_notify_sends_one_datagram_and_flattens_newlines_in_status(receiver: Receiver) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": receiver.notify_socket})
    notifier.notify("RELOADING=1", "MONOTONIC_USEC=5")
    notifier.status("two\nlines")
    assert receiver.received() == [b"RELOADING=1\nMONOTONIC_USEC=5", b"STATUS=two lines"]


def test_abstract_namespace_socket(abstract_receiver: Receiver) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": abstract_receiver.notify_socket})
    notifier.ready("ready")
    assert abstract_receiver.received() == [b"READY=1\nSTATUS=ready"]


def test_reads_the_process_environment_by_default(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    Notifier().status("from os.environ")
    assert receiver.received() == [b"STATUS=from os.environ"]


def test_disabled_without_notify_socket_sends_nothing(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process environment names a live socket, but the notifier was given none.
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    notifier = Notifier(env={})
    assert not notifier.enabled
    notifier.ready("ready")
    notifier.stopping("stopping")
    notifier.status("status")
    assert receiver.received() == []
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().enabled


def test_missing_socket_logs_a_warning_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="taskd.systemd"):
        notifier.ready("ready")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "nobody-listens" in caplog.records[0].getMessage()


def test_unsupported_address_disables_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="taskd.systemd"):
        notifier = Notifier(env={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "100000"}, 0.05),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        # Inherited from a parent the watchdog was meant for: not ours to ping.
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval(
    receiver: Receiver, extra: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": receiver.notify_socket, **extra})
    assert notifier.watchdog_interval == interval


def test_no_watchdog_without_notify_socket() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "2000000"}).watchdog_interval is None


async def test_run_watchdog_pings_until_cancelled(receiver: Receiver) -> None:
    notifier = Notifier(env={"NOTIFY_SOCKET": receiver.notify_socket, "WATCHDOG_USEC": "100000"})
    pings: list[bytes] = []

    async def three_pings() -> bool:
        pings.extend(receiver.received())
        return len(pings) >= 3

    async with anyio.create_task_group() as tg:
        tg.start_soon(notifier.run_watchdog)
        await wait_until(three_pings, "three watchdog pings", deadline=30)
        tg.cancel_scope.cancel()
    assert set(pings) == {b"WATCHDOG=1"}


async def test_run_watchdog_returns_at_once_when_not_asked(receiver: Receiver) -> None:
    with anyio.fail_after(10):
        await Notifier(env={"NOTIFY_SOCKET": receiver.notify_socket}).run_watchdog()
        await Notifier(env={}).run_watchdog()
    assert receiver.received() == []


# The unit files, against the steps docs/operations.md gives to install them, and through
# `systemd-analyze verify` as shipped. verify exits 0 even for settings it cannot parse
# (it ignores them, as systemd would): only its messages naming the unit tell.

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd)",
)
UNIT_CASES = [("taskd.service", "taskd.service"), ("taskd@.service", "taskd@1.service")]
# This machine's own units, which a unit's dependencies (network-online.target) name.
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def documented_install() -> list[str]:
    """The commands of the install block under "Running under systemd", without comments."""
    [block] = [
        block
        for block in parse_blocks(REPO / "docs" / "operations.md")
        if "cp systemd/taskd.service" in block.body
    ]
    return [line.partition("   #")[0].rstrip() for line in block.body.splitlines()]


def documented_program() -> str:
    """The console script the documented steps install: the venv's bin/taskd."""
    [venv] = [
        found[1]
        for line in documented_install()
        if (found := re.match(r"python3 -m venv (\S+) && \1/bin/pip install ", line))
    ]
    return f"{venv}/bin/taskd"


def exec_start(source: str) -> list[str]:
    [line] = re.findall(r"(?m)^ExecStart=(.*)$", (UNITS / source).read_text())
    return line.split()


@pytest.mark.parametrize("source", [source for source, _ in UNIT_CASES])
def test_units_start_the_taskd_the_documented_steps_install(source: str) -> None:
    program, *args = exec_start(source)
    assert program == documented_program()
    if source == "taskd.service":
        [config] = [
            m[1]
            for line in documented_install()
            if (m := re.search(r"cp config/taskd.toml (\S+)", line))
        ]
        assert args == ["--config", config]


def test_the_units_install_comment_is_the_documented_steps() -> None:
    comments = [
        line.removeprefix("#").strip()
        for line in (UNITS / "taskd.service").read_text().splitlines()
        if line.startswith("#")
    ]
    for command in documented_install():
        assert command in comments


def rooted_install(root: Path, source: str, name: str, *, script: bool = True) -> Path:
    """Under `root`, for `verify --root`: the unit as shipped where the documented steps put
    it, beside copies of this machine's own units, and (with `script`) the console script of
    the taskd under test at the path ExecStart names. The real system is left alone."""
    assert SCRIPT.exists(), f"no console script at {SCRIPT}: pip install -e . first"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    unit = root / "etc" / "systemd" / "system" / name
    unit.parent.mkdir(parents=True)
    shutil.copyfile(UNITS / source, unit)
    if script:
        installed = root / documented_program().lstrip("/")
        installed.parent.mkdir(parents=True)
        shutil.copy2(SCRIPT, installed)
    return unit


def verify_problems(root: Path, unit: Path) -> tuple[list[str], str]:
    """What `systemd-analyze verify` finds wrong with the unit under `root`, and its whole
    output."""
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", f"/{unit.relative_to(root)}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if unit.name in line]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}")
    return problems, output


@needs_systemd_analyze
@pytest.mark.parametrize(("source", "name"), UNIT_CASES)
def test_unit_as_shipped_passes_systemd_analyze_verify(
    tmp_path: Path, source: str, name: str
) -> None:
    unit = rooted_install(tmp_path, source, name)
    problems, output = verify_problems(tmp_path, unit)
    assert problems == [], f"systemd-analyze verify {name}:\n{output}"


@needs_systemd_analyze
@pytest.mark.parametrize(("source", "name"), UNIT_CASES)
def test_verify_catches_a_broken_unit(tmp_path: Path, source: str, name: str) -> None:
    unit = rooted_install(tmp_path, source, name)
    text = unit.read_text()
    assert "\nType=notify\n" in text
    unit.write_text(text.replace("\nType=notify\n", "\nType=notifyy\n"))
    problems, output = verify_problems(tmp_path, unit)
    assert any("notifyy" in line for line in problems), output


@needs_systemd_analyze
def test_verify_looks_for_the_program_under_the_root(tmp_path: Path) -> None:
    unit = rooted_install(tmp_path, "taskd.service", "taskd.service", script=False)
    problems, output = verify_problems(tmp_path, unit)
    assert any(f"Command {documented_program()} is not executable" in line for line in problems), (
        output
    )


@pytest.mark.parametrize("source", [source for source, _ in UNIT_CASES])
def test_stop_timeout_outlasts_the_default_drain(source: str) -> None:
    # Otherwise systemd SIGKILLs a daemon still draining with the default shutdown_timeout,
    # returning its unfinished jobs, or stopping its archiver process.
    match = re.search(r"^TimeoutStopSec=(\d+)$", (UNITS / source).read_text(), re.MULTILINE)
    assert match is not None
    shutdown = WorkersConfig().shutdown_timeout + FINISH_TIMEOUT + archive_process.STOP_TIMEOUT
    assert int(match[1]) >= shutdown + 5


@pytest.mark.parametrize("source", [source for source, _ in UNIT_CASES])
def test_open_files_limit_holds_the_default_connections_and_jobs(source: str) -> None:
    # Below it, file descriptors would run out before [server] max_connections is reached.
    match = re.search(r"^LimitNOFILE=(\d+)$", (UNITS / source).read_text(), re.MULTILINE)
    assert match is not None
    needed = open_files_needed(ServerConfig().max_connections, WorkersConfig().concurrency)
    assert int(match[1]) >= needed
