#!/usr/bin/env python3
"""`instance.py start|stop N DIR`: what `systemctl start|stop taskd@N` does, for the tests.

start runs a real daemon, `taskd --config DIR/N.toml`, in the background (its log in
DIR/N.log, its pid in DIR/N.pid) and returns once its /health answers 200, as systemd
returns once a Type=notify unit is ready; it does nothing when the instance runs already.
stop sends it SIGTERM and returns once it is gone (it drains first), as `systemctl stop`
does; nothing when it does not run. Exit 1 when the daemon fails to start or to stop.
"""

import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

DEADLINE = 60.0


def gone(pid: int) -> bool:
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


def running(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
    except FileNotFoundError:
        return None
    return None if gone(pid) else pid


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(config: Path, pid_file: Path, log: Path) -> int:
    if running(pid_file) is not None:
        return 0
    listen = tomllib.loads(config.read_text())["server"]["listen"]
    with log.open("ab") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "taskd", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a unit of its own: no signal to this script reaches it
        )
    pid_file.with_suffix(".tmp").write_text(str(daemon.pid))
    os.replace(pid_file.with_suffix(".tmp"), pid_file)
    end = time.monotonic() + DEADLINE
    while not healthy(f"http://{listen}"):
        if daemon.poll() is not None or time.monotonic() > end:
            print(f"instance {pid_file.stem} did not start; see {log}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def stop(pid_file: Path) -> int:
    pid = running(pid_file)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + DEADLINE
        while not gone(pid):
            if time.monotonic() > end:
                print(f"instance {pid_file.stem} (pid {pid}) did not stop", file=sys.stderr)
                return 1
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return 0


def main() -> int:
    action, number, directory = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    pid_file = directory / f"{number}.pid"
    if action == "start":
        return start(directory / f"{number}.toml", pid_file, directory / f"{number}.log")
    return stop(pid_file)


sys.exit(main())
