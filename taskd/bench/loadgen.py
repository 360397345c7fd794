"""The lean HTTP client of intake-single: one keep-alive HTTP/1.1 connection per client.

At thousands of requests a second the bench shares the machine's cores with the daemon
and Redis, so what each request costs the client is taken from the daemon: aiohttp's
client spent as much CPU per request as the daemon did (about 170 µs on a loaded 2-core
machine). Here a request is bytes built once, written whole, and its answer is read by
its Content-Length, nothing else (the daemon answers every request with one): about a
fifth of aiohttp's cost.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio

from taskd.bench.harness import BenchError, HttpError

HEAD_LIMIT = 64 * 1024  # bytes an answer's head may take


@dataclass(frozen=True, slots=True)
class Target:
    """Where the daemon listens: host and port (TLS for https), or a unix socket."""

    host: str
    port: int = 0
    tls: bool = False
    unix_path: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Target:
        """From http://HOST:PORT, https://HOST:PORT or unix:/PATH."""
        if url.startswith("unix:"):
            return cls("localhost", unix_path=url.removeprefix("unix:"))
        parts = urlsplit(url)
        if parts.hostname is None:
            raise BenchError(f"not an http:// or unix: URL: {url}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls)

    @property
    def host_header(self) -> str:
        if self.unix_path is not None:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix_path is not None:
            return await asyncio.open_unix_connection(self.unix_path, limit=HEAD_LIMIT)
        context = ssl.create_default_context() if self.tls else None
        return await asyncio.open_connection(self.host, self.port, ssl=context, limit=HEAD_LIMIT)


def post_request(target: Target, path: str, body: bytes) -> bytes:
    """One POST of a JSON body, whole, as the bench's aiohttp session would send it."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {target.host_header}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token := os.environ.get("TASKD_TOKEN"):
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send_from_clients(
    target: Target, path: str, request: bytes, clients: int, count: int
) -> list[float]:
    """`count` requests shared by `clients` concurrent keep-alive connections, each
    sending its next request once the last one is answered; every answer must be 2xx.
    Returns each request's latency in ms, from writing it to reading its answer whole."""
    latencies: list[float] = []
    left = count

    async def client() -> None:
        nonlocal left
        reader, writer = await target.connect()
        try:
            while left > 0:
                left -= 1
                started = time.perf_counter()
                writer.write(request)
                await _answer(reader, path)
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            writer.close()

    async with anyio.create_task_group() as tg:
        for _ in range(min(clients, count)):
            tg.start_soon(client)
    return latencies


async def _answer(reader: asyncio.StreamReader, path: str) -> bytes:
    """Read one answer whole; its body, or HttpError unless it is a 2xx."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = _content_length(head)
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        raise BenchError(f"POST {path}: the connection failed: {exc!r}") from None
    status = int(head[9:12])
    if not 200 <= status < 300:
        raise HttpError(status, body, f"POST {path}")
    return body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise BenchError(f"an answer without Content-Length: {head[:200]!r}")
