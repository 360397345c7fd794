"""systemd integration: the sd_notify protocol (readiness, stopping, watchdog)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import anyio

logger = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """The socket address NOTIFY_SOCKET names, or None for a kind this module cannot reach."""
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        # An abstract-namespace socket: Linux spells its name with a leading NUL.
        return "\0" + value[1:]
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC as a positive integer, or None when it is unset, zero or malformed."""
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        if raw:
            logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    return usec if usec > 0 else None


def _watchdog_pid(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_PID, 0 when it is malformed (so it never matches), None when it is unset."""
    raw = env.get("WATCHDOG_PID", "")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        logger.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", raw)
        return 0


def _field(name: str, value: str) -> str:
    # A newline would end the field early and smuggle in another assignment.
    flat = value.replace("\n", " ")
    return f"{name}={flat}"


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET; does nothing when it is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            logger.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract; not notifying", raw)
        self._watchdog_usec = _watchdog_usec(env)
        self._watchdog_pid = _watchdog_pid(env)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere: a usable NOTIFY_SOCKET was set."""
        return self._address is not None

    def notify(self, *fields: str) -> None:
        """Send the fields ("READY=1", ...) as one datagram; failures are logged, not raised."""
        if self._address is None or not fields:
            return
        message = "\n".join(fields).encode()
        # A socket per message: no state to go stale, and messages are rare (the watchdog
        # pings every few seconds at most). Non-blocking, so a full queue never stalls the loop.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._address)
        except OSError as exc:
            logger.warning("cannot notify systemd at %r: %s", self._address, exc)

    def ready(self, status: str) -> None:
        """Tell systemd start-up is done (Type=notify waits for this)."""
        self.notify("READY=1", _field("STATUS", status))

    def stopping(self, status: str) -> None:
        """Tell systemd the shutdown has begun."""
        self.notify("STOPPING=1", _field("STATUS", status))

    def status(self, status: str) -> None:
        """Set the line `systemctl status` shows."""
        self.notify(_field("STATUS", status))

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of WATCHDOG_USEC, as sd_watchdog_enabled advises.

        None when no watchdog is asked of this process: WATCHDOG_USEC unset or 0, WATCHDOG_PID
        naming another process (the variables were inherited), or no NOTIFY_SOCKET to ping.
        """
        if self._watchdog_usec is None or not self.enabled:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2_000_000

    async def run_watchdog(self) -> None:
        """Send WATCHDOG=1 every watchdog_interval until cancelled; return at once if unasked."""
        interval = self.watchdog_interval
        if interval is None:
            return
        logger.info("systemd watchdog: pinging every %g s", interval)
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(interval)
