"""The bench's delay proxy: TCP to a target, each chunk forwarded a fixed time after it came.

It runs as a process of its own (`python -m taskd.bench.delay`), so that its event loop
shares neither the bench's nor a daemon's: `taskd bench --only rtt` puts it between a
daemon and Redis to add a round trip. Each direction holds what it read in a queue,
stamped with when it is due (half the round trip later), and a timer writes out whatever
is due: a chunk read at t is written at t + delay however many are in flight, so the
delay adds latency without limiting throughput. Byte order is kept per connection, and a
half-close or close reaches the other side after the bytes sent before it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import enum
import logging
import os
import selectors
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import uvloop

log = logging.getLogger(__name__)

BACKLOG = 128
_CLOCK_MONOTONIC = 1  # the clock of time.monotonic() on Linux
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc_timerfd() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """timerfd_create and timerfd_settime (Linux; os has them from Python 3.13 only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        return libc.timerfd_create, libc.timerfd_settime
    except AttributeError:
        return None


_TIMERFD = _libc_timerfd()
# How the proxy times what it holds, unless told: "timerfd" (uvloop and Linux's timerfd) or
# "loop" (asyncio's select loop and its own timers).
TIMERS = "timerfd" if _TIMERFD else "loop"


class _Timer(Protocol):
    """Calls back once at a time.monotonic() instant; at() again moves it."""

    def at(self, when: float) -> None: ...

    def close(self) -> None: ...


class _TimerFd:
    """A timer to the microsecond on any loop: a Linux timerfd the loop watches. uvloop's
    own timers count whole milliseconds (it runs a 0.25 ms one at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        assert _TIMERFD is not None
        fd = _TIMERFD[0](_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd = fd
        self._loop = loop
        self._callback = callback
        loop.add_reader(fd, self._fired)

    def at(self, when: float) -> None:
        assert _TIMERFD is not None
        seconds, fraction = divmod(when, 1.0)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(int(seconds), int(fraction * 1e9)))
        if _TIMERFD[1](self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)  # how many times it expired: once, being one-shot
        except BlockingIOError:
            return  # moved on after it expired: not due yet
        self._callback()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class _LoopTimer:
    """The loop's own timer, where there is no timerfd: precise on the select loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None

    def at(self, when: float) -> None:
        self.close()
        self._handle = self._loop.call_at(
            when - time.monotonic() + self._loop.time(), self._callback
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


TimerFactory = Callable[[asyncio.AbstractEventLoop, Callable[[], None]], _Timer]


class _End(enum.Enum):
    """What a direction's queue may hold besides bytes: how the sending side ended."""

    EOF = "eof"  # it half-closed: write EOF after what it sent
    CLOSE = "close"  # it closed, or broke: close after what it sent


class _Side(asyncio.Protocol):
    """One socket of a proxied connection, the client's or the target's: what it reads
    goes to its peer `delay_seconds` later; what its peer read is written here when due."""

    def __init__(
        self, *, delay_seconds: float, timers: TimerFactory, peer: _Side | None = None
    ) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self._delay = delay_seconds
        self._timers = timers
        self._due: deque[tuple[float, bytes | _End]] = deque()
        self._timer: _Timer | None = None  # made at the first chunk it holds
        self._armed = False
        self._early: list[bytes | _End] = []  # what came before the peer was connected
        self._eof_in = False  # the far end half-closed towards us
        self._eof_out = False  # we half-closed towards the far end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connected(self, peer: _Side) -> None:
        """The client's side: its target's side is connected; what came meanwhile goes."""
        self.peer = peer
        for item in self._early:
            peer.send(item)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        self._forward(data)

    def eof_received(self) -> bool:
        self._eof_in = True
        self._forward(_End.EOF)
        self._close_if_done()
        return True  # keep the transport open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.close()
        self._due.clear()
        self._forward(_End.CLOSE)

    def _forward(self, item: bytes | _End) -> None:
        if self.peer is None:
            self._early.append(item)  # a client's side, its target not connected yet
        else:
            self.peer.send(item)

    # This side's transport holds more than it likes to write: stop reading what comes
    # here (from the peer's socket) until it has written some.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def send(self, item: bytes | _End) -> None:
        """Write `item` (what the peer read, or how it ended) here once it is due."""
        if self.transport is None:
            return  # this side is gone: nobody to deliver to
        if self._delay <= 0 and not self._due:
            self._write(item)
            return
        # time.monotonic(), not loop.time(): uvloop's reads the clock once a loop iteration.
        due = time.monotonic() + self._delay
        self._due.append((due, item))
        if not self._armed:
            if self._timer is None:
                self._timer = self._timers(asyncio.get_running_loop(), self._release)
            self._timer.at(due)
            self._armed = True

    def _release(self) -> None:
        """Write what is due, then wait for the next item's time."""
        self._armed = False
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            self._write(self._due.popleft()[1])
        if self._due and self._timer is not None:
            self._timer.at(self._due[0][0])
            self._armed = True

    def _write(self, item: bytes | _End) -> None:
        if self.transport is None:
            return
        if isinstance(item, bytes):
            self.transport.write(item)
        elif item is _End.CLOSE:
            self.transport.close()  # after the buffered bytes
        else:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._eof_out = True
            self._close_if_done()

    def _close_if_done(self) -> None:
        """Closed once both directions have ended: each half-closed its way."""
        if self._eof_in and self._eof_out and self.transport is not None:
            self.transport.close()


class DelayProxy:
    """Accepts connections and connects each to the target, through two `_Side`s."""

    def __init__(
        self, *, target_host: str, target_port: int, delay_seconds: float, timers: TimerFactory
    ) -> None:
        self._target = (target_host, target_port)
        self._delay = delay_seconds
        self._timers = timers
        self._connecting: set[asyncio.Task[None]] = set()

    def accept(self) -> _Side:
        """A protocol for a new client connection; its target connection follows."""
        client = _Side(delay_seconds=self._delay, timers=self._timers)
        task = asyncio.get_running_loop().create_task(self._connect(client))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return client

    async def _connect(self, client: _Side) -> None:
        loop = asyncio.get_running_loop()
        target = _Side(delay_seconds=self._delay, timers=self._timers, peer=client)
        try:
            await loop.create_connection(lambda: target, *self._target)
        except OSError as exc:
            log.warning("cannot connect to %s:%d: %s", *self._target, exc)
            if client.transport is not None:
                client.transport.abort()
            return
        client.connected(target)  # had the client left meanwhile, the target is closed too


async def serve(proxy: DelayProxy, listener: socket.socket) -> None:
    """Serve connections on `listener` until cancelled (or killed)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(proxy.accept, sock=listener)
    async with server:
        await server.serve_forever()


def _loop_and_timers(timers: str) -> tuple[asyncio.AbstractEventLoop, TimerFactory]:
    """uvloop with timerfd timers; else asyncio's loop on select(2), whose waits are to
    the microsecond (epoll_wait's are whole milliseconds), at 2-3 times the CPU a chunk."""
    if timers == "timerfd":
        return uvloop.new_event_loop(), _TimerFd
    return asyncio.SelectorEventLoop(selectors.SelectSelector()), _LoopTimer


def _target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m taskd.bench.delay",
        description="Forward TCP connections to a target, adding a fixed round trip: each "
        "chunk is forwarded half of it after it came, in each direction.",
    )
    parser.add_argument("--target", type=_target, required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--rtt-ms", type=float, required=True, metavar="MS",
        help="round trip to add, in ms: half of it each way",
    )  # fmt: skip
    parser.add_argument(
        "--timers", choices=("timerfd", "loop"), default=TIMERS,
        help="timerfd (Linux, the default there) or the select loop's own",
    )  # fmt: skip
    listen = parser.add_mutually_exclusive_group(required=True)
    listen.add_argument("--listen-port", type=int, metavar="PORT", help="on 127.0.0.1")
    listen.add_argument(
        "--listen-fd", type=int, metavar="FD",
        help="a listening socket handed over by the parent (no race for a free port)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = socket.create_server(("127.0.0.1", args.listen_port), backlog=BACKLOG)
    if args.timers == "timerfd" and _TIMERFD is None:
        _parser().error("--timers timerfd: there is no timerfd here (Linux only)")
    loop, timers = _loop_and_timers(args.timers)
    host, port = args.target
    proxy = DelayProxy(
        target_host=host, target_port=port, delay_seconds=args.rtt_ms / 2 / 1e3, timers=timers
    )
    address = listener.getsockname()
    print(
        f"forwarding {address[0]}:{address[1]} to {host}:{port}, +{args.rtt_ms:g} ms round "
        f"trip, {args.timers} timers",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(serve(proxy, listener))
    return 0


if __name__ == "__main__":
    sys.exit(main())
