"""A TCP proxy in the test's event loop, to misbehave between a daemon and its Redis, or
between a client and its daemon."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Forwards 127.0.0.1:port to a target; blackhole() stops forwarding (connections stay
    open and silent, as a dropped network does), reset() closes every connection, and
    drop_answers() closes connections as their answers come back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0
        self.held = 0  # bytes held back by blackhole(), not forwarded yet
        self._drops = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def blackhole(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self._flowing.set()

    def drop_answers(self, count: int = 1) -> None:
        """The next `count` times the target answers, its answer is not forwarded: both ends
        are closed instead. The target has had the whole request; the client sees none of
        the answer, as when a connection drops at the worst moment."""
        self._drops = count

    def reset(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer, answers=True)
            )
        finally:
            for end in (writer, up_writer):
                self._writers.discard(end)
                end.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answers: bool = False
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if answers and self._drops > 0:
                    self._drops -= 1
                    break
                self.held += len(data)
                try:
                    await self._flowing.wait()  # blackholed: hold the bytes, send nothing
                finally:
                    self.held -= len(data)
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
