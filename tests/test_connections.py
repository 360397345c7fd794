"""Idle and slow connections cannot take the daemon down: real sockets against a daemon.

A connection is closed when its client owes bytes for longer than request_read_timeout
(a request head, or a pause in a body), or idles past keepalive_timeout between requests;
beyond max_connections new ones are closed at once. Each test sets the other timeout
long, so that only the one it is about can close its connections.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web

from taskd.connections import Runner, open_files_needed, warn_if_few_files
from taskd.daemon import Daemon
from tests.support import (
    DEADLINE,
    base_url,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
    wait_until,
)

# Room on top of a timeout for a loaded 2-core machine to get round to closing.
SLACK = 5.0
Address = tuple[str, int] | str
Open = Callable[[Address], Awaitable[socket.socket]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


@pytest.fixture
def open_socket() -> Iterator[Open]:
    """Connects a non-blocking socket to an address; every one is closed after the test."""
    opened: list[socket.socket] = []

    async def connect(address: Address) -> socket.socket:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        opened.append(sock)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        return sock

    yield connect
    for sock in opened:
        sock.close()


def is_closed(sock: socket.socket) -> bool:
    """Whether the daemon has closed the connection (reading and dropping what it sent)."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True


async def closes(sock: socket.socket, what: str, within: float) -> float:
    """Wait until the daemon closes `sock`; the seconds that took."""
    start = time.monotonic()

    async def closed() -> bool:
        return is_closed(sock)

    await wait_until(closed, what, deadline=within)
    return time.monotonic() - start


async def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send a request and read its whole response (by Content-Length); the response head."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request)
    data = b""
    with anyio.fail_after(DEADLINE):
        while b"\r\n\r\n" not in data:
            data += await _received(loop, sock)
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert match is not None, head
        while len(body) < int(match[1]):
            body += await _received(loop, sock)
    return head


async def _received(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    chunk = await loop.sock_recv(sock, 65536)
    assert chunk, "the daemon closed the connection"
    return chunk


def health_request() -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def address_of(daemon: Daemon) -> tuple[str, int]:
    host, port = daemon.api.addresses[0][:2]
    return host, port


@asynccontextmanager
async def daemon_with(redis_url: str, **server: Any) -> AsyncIterator[Daemon]:
    # Long Redis deadline: a stalled body must be cut off by request_read_timeout alone.
    config = make_config(redis_url, server=server, redis={"request_timeout": 60})
    async with running_daemon(config) as daemon:
        yield daemon


async def served(url: str) -> None:
    """A new client is answered: /health is ok, and a JSON job is taken and completed."""
    async with aiohttp.ClientSession() as session:
        status, health = await get_json(session, f"{url}/health")
        assert (status, health) == (200, {"status": "ok"})
        status, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": 7})
        assert status == 201, job
        done = await wait_for_state(session, url, job["id"], {"completed", "failed"})
        assert (done["state"], done["result"]) == ("completed", 7)


# The cap


async def test_beyond_the_cap_connections_are_closed_at_once_until_idle_ones_time_out(
    redis_url: str, open_socket: Open, caplog: pytest.LogCaptureFixture
) -> None:
    # Long enough that the 20 still hold their places while the others are refused, even
    # on a loaded machine.
    async with daemon_with(
        redis_url, max_connections=20, request_read_timeout=8, keepalive_timeout=60
    ) as daemon:
        address = address_of(daemon)
        held = [await open_socket(address) for _ in range(20)]

        async def all_admitted() -> bool:
            return daemon.api.open_connections == 20

        await wait_until(all_admitted, "the daemon to take the 20 connections")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="taskd.connections"):
            extra = [await open_socket(address) for _ in range(10)]
            await asyncio.get_running_loop().sock_sendall(extra[0], health_request())
            for sock in extra:
                await closes(sock, "a connection beyond the cap to be closed", SLACK)
            # Closed while the 20 still held their places: refused, not timed out.
            assert not [sock for sock in held if is_closed(sock)]
            assert daemon.api.open_connections == 20
        refusals = [r for r in caplog.records if "closed at once" in r.getMessage()]
        assert len(refusals) == 1, "a flood of refusals is reported once"
        assert "max_connections" in refusals[0].getMessage()

        # The held ones sent nothing: request_read_timeout closes them, and a new client
        # is served again.
        for sock in held:
            await closes(sock, "an idle connection to time out", 8 + SLACK)
        await served(base_url(daemon))


async def test_the_cap_counts_a_unix_socket_too(
    redis_url: str, open_socket: Open, tmp_path: Path
) -> None:
    path = str(tmp_path / "taskd.sock")
    server = {"listen": f"unix:{path}", "max_connections": 2, "request_read_timeout": 60}
    async with running_daemon(make_config(redis_url, server=server)) as daemon:
        held = [await open_socket(path) for _ in range(2)]
        head = await exchange(held[0], health_request())
        assert head.startswith(b"HTTP/1.1 200 "), head
        refused = await open_socket(path)
        await closes(refused, "a connection beyond the cap to be closed", SLACK)
        assert not is_closed(held[1])
        assert daemon.api.open_connections == 2
        held[1].close()

        async def one_left() -> bool:
            return daemon.api.open_connections == 1

        await wait_until(one_left, "the daemon to see a connection go")
        # A place is free again: the next connection is served.
        again = await open_socket(path)
        assert (await exchange(again, health_request())).startswith(b"HTTP/1.1 200 ")


# Request heads that do not come


async def test_a_silent_connection_is_closed_after_request_read_timeout(
    redis_url: str, open_socket: Open
) -> None:
    async with daemon_with(redis_url, request_read_timeout=1, keepalive_timeout=60) as daemon:
        sock = await open_socket(address_of(daemon))
        await closes(sock, "a silent connection to be closed", 1 + SLACK)
        assert daemon.api.open_connections == 0


async def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(
    redis_url: str, open_socket: Open
) -> None:
    async with daemon_with(redis_url, request_read_timeout=1, keepalive_timeout=60) as daemon:
        address = address_of(daemon)
        lorises = [await open_socket(address) for _ in range(5)]
        # One had a whole request answered first: its next head is due all the same.
        assert (await exchange(lorises[0], health_request())).startswith(b"HTTP/1.1 200 ")
        took: list[float] = []
        with anyio.fail_after(DEADLINE + 10):
            async with anyio.create_task_group() as tg:
                for sock in lorises:
                    tg.start_soon(_slow_loris, sock, took)
                # Meanwhile, the daemon serves others.
                await served(base_url(daemon))
        # Each sent a byte every 50 ms throughout: the bytes did not restart the deadline.
        assert len(took) == 5
        assert max(took) < 1 + SLACK, took


async def _slow_loris(sock: socket.socket, took: list[float]) -> None:
    """Send a request head that never ends, a byte at a time, until the daemon hangs up."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    for byte in itertools.chain(head, itertools.repeat(ord("a"))):
        if is_closed(sock):
            break
        try:
            await loop.sock_sendall(sock, bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        await anyio.sleep(0.05)
    took.append(time.monotonic() - start)


async def test_a_long_request_is_not_cut_off(redis_url: str) -> None:
    # The event stream runs for as long as the client reads it: once its head is in, the
    # client owes nothing, whatever request_read_timeout says.
    async with (
        daemon_with(redis_url, request_read_timeout=1, keepalive_timeout=60) as daemon,
        aiohttp.ClientSession() as session,
        session.get(f"{base_url(daemon)}/events") as response,
    ):
        assert response.status == 200
        events = 0
        start = time.monotonic()
        with anyio.fail_after(DEADLINE):
            async for line in response.content:
                events += line.startswith(b"event: picture")
                if events == 4:
                    break
        assert events == 4
        assert time.monotonic() - start > 2  # a second between events: past the timeout


# Bodies


async def test_a_stalled_body_is_cut_off_without_a_false_alarm(
    redis_url: str, open_socket: Open, caplog: pytest.LogCaptureFixture
) -> None:
    head = (
        b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    async with daemon_with(redis_url, request_read_timeout=1, keepalive_timeout=60) as daemon:
        sock = await open_socket(address_of(daemon))
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            await asyncio.get_running_loop().sock_sendall(sock, head + b'{"type": ')
            await closes(sock, "a stalled body to be cut off", 1 + SLACK)
            await served(base_url(daemon))
        # The handler's read failed when the connection closed: that is no Redis outage.
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert loud == []
        assert "request_read_timeout" in caplog.text


async def test_a_slow_but_steady_body_is_read_whole(redis_url: str, open_socket: Open) -> None:
    body = orjson.dumps({"type": "echo", "payload": "a steady trickle"})
    head = (
        b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    async with daemon_with(redis_url, request_read_timeout=2, keepalive_timeout=60) as daemon:
        sock = await open_socket(address_of(daemon))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, head)
        start = time.monotonic()
        # A byte every 100 ms: far slower in all than the timeout, never pausing for it.
        for byte in body[:-1]:
            await loop.sock_sendall(sock, bytes([byte]))
            await anyio.sleep(0.1)
        assert time.monotonic() - start > 2 * 2
        response = await exchange(sock, body[-1:])
        assert response.startswith(b"HTTP/1.1 201 "), response


async def test_a_large_body_at_full_speed_is_read_whole(redis_url: str) -> None:
    # Bigger than aiohttp buffers before it pauses reading: the pauses are the daemon's,
    # and must not count as the client's.
    jobs = [{"type": "noop", "payload": "x" * 200_000} for _ in range(20)]
    async with (
        daemon_with(
            redis_url, request_read_timeout=1, keepalive_timeout=60, max_body=8_000_000
        ) as daemon,
        aiohttp.ClientSession() as session,
    ):
        body = io.BytesIO(orjson.dumps({"jobs": jobs}))
        async with session.post(
            f"{base_url(daemon)}/jobs/batch",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            status, answer = response.status, await response.json()
        assert status == 201, answer
        assert len(answer["ids"]) == 20


@asynccontextmanager
async def bare_app(handler: Handler) -> AsyncIterator[tuple[str, int]]:
    """An app of one handler (POST and GET /) on Runner with read_timeout 1 s: for what
    no taskd endpoint does (wait before reading a body, take long to answer)."""
    app = web.Application(client_max_size=8_000_000)
    app.router.add_route("*", "/", handler)
    runner = Runner(
        app, max_connections=10, read_timeout=1, keepalive_timeout=60, shutdown_timeout=1
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield host, port
    finally:
        await runner.cleanup()


async def slow_reader(request: web.Request) -> web.Response:
    # Until it reads, aiohttp stops reading once its buffer is full: that wait is the
    # server's, not the client's.
    await anyio.sleep(2)
    return web.Response(text=str(len(await request.read())))


async def test_a_handler_slow_to_read_the_body_does_not_count_against_the_client() -> None:
    async with (
        bare_app(slow_reader) as (host, port),
        aiohttp.ClientSession() as session,
        session.post(f"http://{host}:{port}/", data=io.BytesIO(b"x" * 4_000_000)) as answer,
    ):
        assert (answer.status, await answer.text()) == (200, "4000000")


async def test_a_body_that_stalls_after_the_server_caught_up_is_cut_off(
    open_socket: Open,
) -> None:
    # Just past aiohttp's buffer (512 KiB in 3.14), so that reading pauses until the
    # handler reads; then nothing more: the client owes the rest from the moment the
    # handler caught up.
    async with bare_app(slow_reader) as address:
        sock = await open_socket(address)
        head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n"
        await asyncio.get_running_loop().sock_sendall(sock, head + b"x" * 530_000)
        await closes(sock, "a body stalled after a pause to be cut off", 2 + 1 + SLACK)


# Idle keep-alive connections


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
    redis_url: str, open_socket: Open
) -> None:
    async with daemon_with(redis_url, request_read_timeout=1, keepalive_timeout=3) as daemon:
        sock = await open_socket(address_of(daemon))
        assert (await exchange(sock, health_request())).startswith(b"HTTP/1.1 200 ")
        took = await closes(sock, "an idle keep-alive connection to be closed", 3 + SLACK)
        # keepalive_timeout's doing: request_read_timeout does not apply between requests.
        assert took > 2.5, took
        assert daemon.api.open_connections == 0


# The open-files limit


def test_a_too_low_open_files_limit_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no open-files limit to be below")
    with caplog.at_level(logging.WARNING, logger="taskd.connections"):
        warn_if_few_files(max_connections=1, concurrency=1)
        assert open_files_needed(1, 1) < soft
        assert caplog.records == []
        warn_if_few_files(max_connections=soft, concurrency=1)
    [record] = caplog.records
    assert f"the open-files limit is {soft}" in record.getMessage()
    assert "LimitNOFILE" in record.getMessage()
