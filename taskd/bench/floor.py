"""The intake's floor: aiohttp alone answering POST /jobs, with nothing of taskd behind it.

It runs as a process of its own (`python -m taskd.bench.floor --listen-fd N`), started
by intake-single right after it measures the daemon, and takes the same requests from
the same clients. Its rate is the most any aiohttp intake on this machine could accept:
one request's JSON parsed, an answer of a queued job's size built and sent, and no Redis.
How far below it the daemon is shows what taskd's own per-request work costs, apart
from the HTTP server's, in the same minute.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Sequence

import orjson
import uvloop
from aiohttp import web

from taskd.jobs import new_id, now_ms


async def submit(request: web.Request) -> web.Response:
    """What every intake must do for a job: read and parse it, answer it as created."""
    job = orjson.loads(await request.read())
    job_id = new_id()
    answer = {
        "id": job_id, "type": job["type"], "queue": "default", "state": "queued",
        "payload": job.get("payload"), "attempts": 0, "created_at": now_ms(),
        "started_at": None, "finished_at": None, "result": None, "error": None,
        "daemon": None, "max_attempts": 3, "run_at": None, "cancel_requested": False,
        "idempotency_key": None, "callback_url": None, "priority": 5,
        "waiting_for": None, "progress": None, "history": [],
    }  # fmt: skip
    return web.Response(
        body=orjson.dumps(answer),
        status=201,
        content_type="application/json",
        headers={"Location": f"/jobs/{job_id}"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m taskd.bench.floor")
    parser.add_argument("--listen-fd", type=int, required=True, help="a bound TCP socket")
    args = parser.parse_args(argv)
    app = web.Application()
    app.router.add_post("/jobs", submit)
    sock = socket.socket(fileno=args.listen_fd)
    uvloop.run(_serve(app, sock))


async def _serve(app: web.Application, sock: socket.socket) -> None:
    # No access log, as the daemon's API (taskd.api): a line per request costs more than it.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        await asyncio.Event().wait()  # until the bench stops it
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
