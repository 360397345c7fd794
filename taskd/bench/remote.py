"""What pickup and the --url run measure through a daemon's HTTP API alone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
import orjson

from taskd.bench.harness import POLL, Bench, BenchError, HttpError
from taskd.bench.report import Figure, latency_figures

PICKUP_RATE = 200.0  # jobs/s
IDLE_DEADLINE = 300.0  # s a --url daemon gets to run the jobs left before pickup starts
PROBE_TYPE = "taskd-bench-probe"
FETCH_CLIENTS = 16  # concurrent GETs of the jobs pickup sent, after it measured


async def pickup(bench: Bench) -> list[Figure]:
    """Pickup through a daemon's HTTP API alone: its `stamp` handler if it has one."""
    assert bench.url is not None
    url, n = bench.url, bench.size("pickup")
    use_stamp = "stamp" in await configured_types(bench, url)
    body = orjson.dumps({"type": "stamp" if use_stamp else "noop"})
    await _wait_idle(bench, url)
    sent: list[tuple[str, int]] = []
    begin = anyio.current_time()
    for i in range(n):
        await anyio.sleep_until(begin + i / PICKUP_RATE)
        t0 = time.time_ns()
        job = await bench.json("POST", f"{url}/jobs", body)
        sent.append((str(job["id"]), t0))
    jobs = await _finished_jobs(bench, url, [job_id for job_id, _ in sent])
    if use_stamp:
        bench.note(
            "pickup (--url): from sending POST /jobs to the stamp handler starting, the HTTP "
            "request included; assumes the daemon's clock is this machine's"
        )
        return latency_figures(
            [(job["result"]["t"] - t0) / 1e6 for (_, t0), job in zip(sent, jobs, strict=True)]
        )
    bench.note(
        'pickup (--url): the daemon has no `stamp` handler (python = "taskd.bench:stamp"), so '
        "latency is started_at - created_at of the job records, at millisecond resolution"
    )
    return latency_figures([_ms_between(job["created_at"], job["started_at"]) for job in jobs])


async def _wait_idle(bench: Bench, url: str) -> None:
    """Until no job waits or runs: else pickup would measure the backlog (the intake
    workloads leave thousands of jobs behind). A daemon that stays busy gets a note."""
    deadline = time.monotonic() + IDLE_DEADLINE
    while time.monotonic() < deadline:
        queues = (await bench.json("GET", f"{url}/stats")).get("queues", {})
        if not sum(q.get("queued", 0) + q.get("active", 0) for q in queues.values()):
            return
        await anyio.sleep(POLL * 10)
    bench.note(f"pickup (--url): the daemon was still busy after {IDLE_DEADLINE:g} s of waiting")


async def configured_types(bench: Bench, url: str) -> set[str]:
    """The daemon's job types, from its answer to a job of a type it does not know.

    Nothing is enqueued: the job is refused whole.
    """
    try:
        await bench.call("POST", f"{url}/jobs", orjson.dumps({"type": PROBE_TYPE}))
    except HttpError as exc:
        error = orjson.loads(exc.body).get("error", {}) if exc.status == 422 else {}
        if error.get("code") == "unknown_type":
            _, _, known = str(error["message"]).partition("configured types: ")
            return {name.strip() for name in known.split(",")}
        raise
    raise BenchError(f"{url} accepted a job of type {PROBE_TYPE!r}; is it a taskd daemon?")


async def _finished_jobs(bench: Bench, url: str, ids: Sequence[str]) -> list[dict[str, Any]]:
    """GET each job until it completed, 16 at a time; in the order of `ids`."""
    found: dict[str, dict[str, Any]] = {}
    pending = iter(ids)

    async def fetch() -> None:
        for job_id in pending:
            deadline = time.monotonic() + 60
            while (job := await bench.json("GET", f"{url}/jobs/{job_id}"))["state"] != "completed":
                if job["state"] in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise BenchError(f"job {job_id} did not complete: {job['state']}")
                await anyio.sleep(POLL)
            found[job_id] = job

    async with anyio.create_task_group() as tg:
        for _ in range(FETCH_CLIENTS):
            tg.start_soon(fetch)
    return [found[job_id] for job_id in ids]


def _ms_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds() * 1e3
