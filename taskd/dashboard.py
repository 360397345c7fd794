"""The dashboard: its page, its static files, and the event stream that keeps it live."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import anyio
import orjson
from aiohttp import web

logger = logging.getLogger(__name__)

# How often the event stream sends a fresh picture.
EVENT_INTERVAL = 1.0
# The files of the page, by suffix, and the content type each is served as.
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
}


class Dashboard:
    """Serves the page and streams stats and recent jobs to it."""

    def __init__(
        self,
        *,
        picture: Callable[[], Awaitable[dict[str, Any]]],
        stopping: Callable[[], bool],
    ) -> None:
        self._picture = picture
        self._stopping = stopping

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/events", self.events)

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        suffix = name[name.rfind(".") :] if "." in name else ""
        path = resources.files("taskd").joinpath("static", name)
        if "/" in name or suffix not in CONTENT_TYPES or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type=CONTENT_TYPES[suffix])

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one `picture` event a second until the client or we go."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            while not self._stopping():
                picture = await self._picture()
                await response.write(b"event: picture\ndata: " + orjson.dumps(picture) + b"\n\n")
                await anyio.sleep(EVENT_INTERVAL)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        return response
