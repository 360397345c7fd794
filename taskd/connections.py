"""The intake's connections: idle and slow clients cannot use up the daemon's file descriptors.

Every connection holds a descriptor, and the daemon needs descriptors for its Redis
connections, exec pipes and callbacks too. aiohttp closes an idle keep-alive connection
after `keepalive_timeout` (a RequestHandler option, passed through), but sets no deadline
for a request head or a stalled body, nor a cap on connections. This module adds both,
at the protocol level, because only there are the bytes seen as they arrive:

- `Runner`, a web.AppRunner, serves with `_Server`, a web.Server (the protocol factory
  of every site the runner has), which builds `_Connection`s;
- `_Connection`, a web_protocol.RequestHandler, keeps a deadline while the client owes
  bytes, and is refused (closed at once) beyond `max_connections`.

What aiohttp is relied on for, all present from 3.9 to 3.14 (tests/test_connections.py
fails if that changes): the asyncio Protocol methods of RequestHandler (connection_made,
data_received, connection_lost, pause_reading, resume_reading), its force_close() and
finish_response() (called once each request's response is written), web.Server's
request_factory (called as each request starts being handled), request_handler and
handler_cancellation, and, the one underscored name, web.AppRunner._make_server: the
method every runner class implements to build its server, which Runner calls and whose
result it rebuilds as a _Server. No private attribute of aiohttp's is read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from typing import Any

import orjson
from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage

logger = logging.getLogger(__name__)

# Refused connections are reported at most this often: a flood must not flood the log.
REFUSAL_REPORT_INTERVAL = 60.0
# Open files the daemon needs besides its HTTP connections: each running job holds at
# most 3 (an exec program's pipes; an http job holds one socket), and the rest (Redis
# pools, callback sockets, listening sockets, logs, the event loop) stay below this.
FILES_PER_JOB = 3
OWN_FILES = 500


def open_files_needed(max_connections: int, concurrency: int) -> int:
    """File descriptors a daemon with these settings may hold at once (LimitNOFILE)."""
    return max_connections + FILES_PER_JOB * concurrency + OWN_FILES


def warn_if_few_files(max_connections: int, concurrency: int) -> None:
    """Log a warning when the open-files limit is below what the settings need: the cap
    on connections would not protect anything if descriptors ran out before it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = open_files_needed(max_connections, concurrency)
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "the open-files limit is %d, below the %d that [server] max_connections = %d "
            "and [workers] concurrency = %d may need: raise it (LimitNOFILE= in the "
            "systemd unit, ulimit -n) or lower those",
            soft,
            needed,
            max_connections,
            concurrency,
        )


class _Gate:
    """The count of one server's open connections, and the cap it admits new ones under."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._refused = 0  # since the last report
        self._quiet_until = -math.inf

    def admit(self) -> bool:
        if self.open < self.limit:
            self.open += 1
            return True
        self._refused += 1
        now = time.monotonic()
        if now >= self._quiet_until:
            logger.warning(
                "%d HTTP connections are open, as many as [server] max_connections allows: "
                "new ones are closed at once (%d since the last report; next report in "
                "%g s at the earliest)",
                self.open,
                self._refused,
                REFUSAL_REPORT_INTERVAL,
            )
            self._refused = 0
            self._quiet_until = now + REFUSAL_REPORT_INTERVAL
        return False

    def release(self) -> None:
        self.open -= 1


class _Connection(web.RequestHandler):
    """One HTTP connection, closed when its client keeps the daemon waiting.

    The deadline (request_read_timeout) runs while the client owes bytes: a request head,
    or the rest of a body. For a head it starts at connecting, or at the first byte of a
    later request (the idle time between requests is keepalive_timeout's), and further
    bytes do not restart it: a head sent a byte at a time must still be complete in time.
    In a body every byte restarts it, so only a pause that long is a stall. While the
    handler works, or reading is paused because it has not consumed what came, there is
    no deadline: that wait is the daemon's, not the client's.

    Bytes of a next request that arrive while one is handled (pipelining) are not timed
    as a head: they would need aiohttp's parser state. Should they stall, aiohttp's
    keepalive_timeout closes the connection once it is idle, as any idle one.
    """

    __slots__ = ("_body", "_busy", "_due", "_gate", "_held", "_read_timeout", "_timer", "_timers")

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (a bad request line, a header too large): the
        client's mistake, answered with the JSON error document of every other error and
        logged as one line at info. aiohttp would answer text/plain and log a traceback
        at error level, which a scanner of the port turns into a flood."""
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        reason = str(exc) if exc is not None else (message or "malformed request")
        logger.info("refused a malformed HTTP request from %s: %s", request.remote, reason)
        error = {"code": "bad_request", "message": f"malformed HTTP request: {reason}"}
        response = web.Response(
            status=status, body=orjson.dumps({"error": error}), content_type="application/json"
        )
        response.force_close()
        return response

    def __init__(
        self,
        manager: web.Server,
        *,
        gate: _Gate,
        read_timeout: float,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._timers = loop  # ours: asyncio.get_running_loop() is a system call on 3.11
        self._gate: _Gate | None = gate  # None once released (or never admitted)
        self._read_timeout = read_timeout
        self._due: float | None = None  # the deadline (loop time) while the client owes bytes
        self._timer: asyncio.TimerHandle | None = None  # set for _due, or earlier
        self._busy = False  # a request of this connection is being handled
        self._body: StreamReader | None = None  # its body, while the client still owes some
        self._held = False  # reading paused: the handler has not consumed what came

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self._gate is not None
        if not self._gate.admit():
            # Refused by closing, without an answer: a 503 would have to wait for the
            # request first (closing with unread bytes resets the connection, which can
            # destroy the answer before the client reads it), and that wait holds the very
            # descriptor the cap protects, for as long as the client likes. A close at
            # once costs nothing and cannot be held (with nothing written, nothing waits
            # to be flushed: the descriptor is freed right away).
            self._gate = None
            transport.close()
            return
        super().connection_made(transport)
        self._arm()  # the first request head is due

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._gate is None:
            return  # refused: aiohttp never saw this connection
        self._gate.release()
        self._gate = None
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not data or self.transport is None:
            return  # b"": aiohttp parsing again what it had buffered, not the client
        if self._body is not None:
            self._body_moved()
        elif not self._busy and self._due is None:
            self._arm()  # the first byte of a request head: the rest is due in time

    def pause_reading(self) -> None:
        super().pause_reading()
        self._held = True
        if self._body is not None:
            self._disarm()

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp calls this whenever the handler has consumed most of what came, paused
        # or not: only the end of a pause gives the client its time again.
        held, self._held = self._held, False
        super().resume_reading(*args, **kwargs)  # may pause again at once
        if held and self._body is not None:
            self._body_moved()

    def request_started(self, payload: StreamReader) -> None:
        """A request's head is in and its handling begins (from _Server's request factory)."""
        self._busy = True
        self._body = payload
        self._body_moved()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            # Written: the connection is idle, for keepalive_timeout to close.
            self._busy = False
            self._body = None
            self._disarm()

    def _body_moved(self) -> None:
        """Body bytes came, or reading resumed: the stall deadline starts again."""
        assert self._body is not None
        if self._body.is_eof():
            self._body = None
            self._disarm()
        elif self._held:
            self._disarm()
        else:
            self._arm()

    # Arming and disarming move the deadline only; its timer, once set, stays, and when it
    # fires it looks at the deadline then. A timer made and cancelled for each request
    # cost 3% of the intake's CPU; this way a busy connection's timer fires once in
    # request_read_timeout, finds nothing due, and the next request sets one again.

    def _arm(self) -> None:
        self._due = self._timers.time() + self._read_timeout
        if self._timer is None:
            self._timer = self._timers.call_at(self._due, self._check_due)

    def _disarm(self) -> None:
        self._due = None

    def _check_due(self) -> None:
        self._timer = None
        if self._due is None:
            return
        if self._timers.time() < self._due:
            self._timer = self._timers.call_at(self._due, self._check_due)
            return
        self._too_slow()

    def _too_slow(self) -> None:
        self._due = None
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        # Debug only: a slow-loris attack would otherwise write a line per connection.
        logger.debug(
            "closing the connection of %s: %s did not come within %g s "
            "([server] request_read_timeout)",
            peer or "a client",
            "the rest of the request body" if self._body is not None else "a request head",
            self._read_timeout,
        )
        self.force_close()


class _Server(web.Server):
    """The protocol factory of a runner's sites: `_Connection`s, all counted by one gate."""

    def __init__(
        self,
        app_server: web.Server,
        *,
        gate: _Gate,
        read_timeout: float,
        **kwargs: Any,
    ) -> None:
        # The application's own server, as web.AppRunner made it: its handler (the app,
        # with its middlewares) and its request factory, which ours wraps.
        self._make_app_request = app_server.request_factory
        super().__init__(
            app_server.request_handler,
            request_factory=self._request_started,
            handler_cancellation=app_server.handler_cancellation,
            **kwargs,
        )
        self._gate = gate
        self._read_timeout = read_timeout
        self._handler_kwargs = kwargs
        self._protocol_loop = asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        return _Connection(
            self,
            gate=self._gate,
            read_timeout=self._read_timeout,
            loop=self._protocol_loop,
            **self._handler_kwargs,
        )

    def _request_started(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, _Connection):
            protocol.request_started(payload)
        return self._make_app_request(message, payload, protocol, writer, task)


class Runner(web.AppRunner):
    """A web.AppRunner whose connections have the limits above; one count for all its sites.

    `keepalive_timeout` is aiohttp's own; `read_timeout` is [server] request_read_timeout;
    other keyword arguments go to every RequestHandler, as with web.AppRunner.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        read_timeout: float,
        keepalive_timeout: float,
        shutdown_timeout: float,
        **kwargs: Any,
    ) -> None:
        self._handler_kwargs = {"keepalive_timeout": keepalive_timeout, **kwargs}
        super().__init__(
            app, handle_signals=False, shutdown_timeout=shutdown_timeout, **self._handler_kwargs
        )
        self._gate = _Gate(max_connections)
        self._read_timeout = read_timeout

    @property
    def open_connections(self) -> int:
        """Connections open now, on every site of this runner."""
        return self._gate.open

    async def _make_server(self) -> web.Server:
        # web.AppRunner's: the app's startup, then the app frozen, and its server.
        app_server = await super()._make_server()
        return _Server(
            app_server, gate=self._gate, read_timeout=self._read_timeout, **self._handler_kwargs
        )
