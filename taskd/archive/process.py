"""The archiver's own process: the daemon starts and watches it, and it runs the archiver.

Writing the archive is CPU work in Python (decoding records, formatting COPY data) that
has nothing to share with the jobs: in the daemon's event loop it took turns with the
claims and acks and cost the drain a third of its rate. In a process of its own it runs
on another core. Both ends of the pipe between them are here:

- The daemon writes one line of JSON on the child's stdin, its settings (a Spec), and
  then a byte when jobs it ended wait to be archived, at most one each WAKE_INTERVAL:
  the child looks at once instead of at its next poll.
- The child exits when its stdin closes (the daemon stopped, or died: a SIGKILL closes
  the pipe too), giving up the queues it archives, so it never outlives its daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from taskd import logs
from taskd.archive.db import Archive
from taskd.archiver import Archiver
from taskd.loop import Outage, repeat
from taskd.store import Store

logger = logging.getLogger(__name__)

# Pause before the daemon starts a child again after it exited.
RESTART_DELAY = 1.0
# How long the daemon waits at shutdown for its child to give up its queues and exit,
# before it kills it (another daemon's archiver then takes over after the lease).
STOP_TIMEOUT = 5.0
# Least time between two wakes the daemon sends, in seconds. A wake matters only to an
# idle child (a busy one looks again after each pass that wrote): one a pass of the
# daemon's event loop cost the daemon a write and the child a read by a worker thread per
# few jobs, 6% of the daemon's CPU and a sixth of the child's while it drained
# (2026-12-08). The last wake of a burst is sent after the interval, never dropped.
WAKE_INTERVAL = 0.01
_WAKE = b"."


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """What the child needs to archive, as the daemon gives it: no config file read again
    (which would import the handlers' modules in it)."""

    redis_url: str
    prefix: str
    cluster: bool
    archive_url: str
    keep_days: int
    daemon_id: str  # the archiver's own id, for the queues' archive leases
    queues: Sequence[str]
    log_level: str
    log_format: str

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Spec:
        fields = json.loads(line)
        fields["queues"] = tuple(fields["queues"])
        return cls(**fields)


class ArchiverProcess:
    """The daemon's side: runs the child, and starts it again should it exit."""

    def __init__(
        self,
        *,
        spec: Spec,
        restart_delay: float = RESTART_DELAY,
        wake_interval: float = WAKE_INTERVAL,
    ) -> None:
        self._spec = spec
        self._restart_delay = restart_delay
        self._wake_interval = wake_interval
        self._process: anyio.abc.Process | None = None
        self._wake = anyio.Event()
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The running child's process id, or None."""
        return None if self._process is None else self._process.pid

    def job_ended(self) -> None:
        """A job this daemon ended waits to be archived: wake the child. Cheap, and
        coalesced: a byte per WAKE_INTERVAL at most, however many jobs ended in it."""
        self._wake.set()

    async def run(self) -> None:
        """Run the child until cancelled, again after each exit."""
        outage = Outage("running the archiver process", logger)
        await repeat(self._run_child, outage=outage, retry_delay=self._restart_delay)

    async def _run_child(self) -> None:
        if self._stopping:
            await anyio.sleep_forever()
        # -P: the working directory (writable by exec handlers, under systemd) is not on
        # the import path of a process that holds the database's URL.
        command = [sys.executable, "-P", "-m", "taskd.archive.process"]
        # stdout and stderr are the daemon's: the child logs where the daemon does. Shielded:
        # a cancellation while it starts would cut short the loop's clean-up of it (see
        # handlers._run_exec); it takes effect below, where _end stops and reaps it.
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                command, stdin=subprocess.PIPE, stdout=None, stderr=None
            )
        self._process = process
        try:
            if self._stopping:  # stop() came while it started: it saw no process to end
                return
            assert process.stdin is not None
            await process.stdin.send(self._spec.encode())
            logger.info("archiver process started (pid %d)", process.pid)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_wakes, process.stdin)
                code = await process.wait()
                tg.cancel_scope.cancel()
        finally:
            self._process = None
            with anyio.CancelScope(shield=True):
                await _end(process)
        if not self._stopping:
            raise ChildExited(f"archiver process {process.pid} exited with status {code}")

    async def _send_wakes(self, stdin: anyio.abc.ByteSendStream) -> None:
        # Until the child is gone, or its stdin closed by stop(): its exit says the rest.
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await stdin.send(_WAKE)
                # Jobs that end meanwhile set the new event: their wake follows this sleep.
                await anyio.sleep(self._wake_interval)

    async def stop(self) -> None:
        """Let the child give up its queues and exit: closing its stdin tells it to."""
        self._stopping = True
        if self._process is not None:
            await _end(self._process)


class ChildExited(Exception):
    """The archiver process exited while the daemon runs."""


async def _end(process: anyio.abc.Process) -> None:
    """Close the child's stdin and wait for it to exit; kill it past STOP_TIMEOUT."""
    if process.returncode is not None:
        return
    if process.stdin is not None:
        # It may have died already.
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.aclose()
    with anyio.move_on_after(STOP_TIMEOUT):
        await process.wait()
        return
    logger.warning("archiver process %d did not stop in %g s: killed", process.pid, STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
        process.kill()
    await process.wait()


# The child's side.


async def _child(spec: Spec) -> None:
    store = Store.from_url(spec.redis_url, prefix=spec.prefix, cluster=spec.cluster, archive=True)
    archive = Archive(url=spec.archive_url, keep_days=spec.keep_days)
    await archive.open()
    archiver = Archiver(store=store, archive=archive, daemon_id=spec.daemon_id, queues=spec.queues)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(archiver.run)
            await _read_wakes(archiver)
            tg.cancel_scope.cancel()
        # Another daemon's archiver takes over these queues at once, not after the lease.
        await archiver.stop()
    finally:
        with anyio.CancelScope(shield=True):
            await archive.close()
            await store.close()


async def _read_wakes(archiver: Archiver) -> None:
    """Wake the archiver on each byte from the daemon; return when stdin closes."""
    stdin = anyio.wrap_file(sys.stdin.buffer)
    while await stdin.read1(4096):
        archiver.wake()


def main() -> int:
    """The child: read the Spec, archive until stdin closes."""
    # The daemon stops it, by closing its stdin, once the daemon has drained: a stop
    # signal sent to the whole group (systemd's, a terminal's Ctrl-C) is the daemon's.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the daemon went away before it said anything
    spec = Spec.decode(line)
    logs.setup(spec.log_level, spec.log_format)
    anyio.run(_child, spec, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
