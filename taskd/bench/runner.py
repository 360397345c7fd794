"""Running the chosen workloads for their rounds, locally or against --url, into a report."""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio

from taskd.bench.archive import archive, archive_queries
from taskd.bench.footprint import idle, memory
from taskd.bench.harness import Bench, BenchError, Local, SoakPlan, http_session, own_redis
from taskd.bench.openloop import open_loop
from taskd.bench.remote import configured_types
from taskd.bench.report import Figure, Report, Result, aggregate, machine, number
from taskd.bench.rtt import rtt
from taskd.bench.soak import soak
from taskd.bench.workloads import concurrency, drain, intake_batch, intake_single, mixed, pickup

Workload = Callable[[Bench], Awaitable[list[Figure]]]
WORKLOADS: dict[str, Workload] = {
    "intake-single": intake_single,
    "intake-batch": intake_batch,
    "drain": drain,
    "pickup": pickup,
    "open-loop": open_loop,
    "concurrency": concurrency,
    "mixed": mixed,
    "idle": idle,
    "memory": memory,
    "soak": soak,
    "rtt": rtt,
    "archive": archive,
    "archive-queries": archive_queries,
}


@dataclass(frozen=True, slots=True)
class Options:
    quick: bool
    as_json: bool
    rounds: int
    workloads: tuple[str, ...]
    url: str | None
    soak: SoakPlan


async def run_rounds(bench: Bench, options: Options) -> list[Result]:
    """Each workload `rounds` times from a clean state, aggregated per figure."""
    results: list[Result] = []
    for name in options.workloads:
        rounds: list[list[Figure]] = []
        for round_number in range(1, options.rounds + 1):
            await bench.reset()
            figures = await WORKLOADS[name](bench)
            said = ", ".join(f"{f.name} {number(f.value)} {f.unit}" for f in figures)
            print(
                f"{name} round {round_number}/{options.rounds}: {said}", file=sys.stderr, flush=True
            )
            rounds.append(figures)
        results += aggregate(name, rounds)
    return results


def run(options: Options) -> Report:
    """Run the bench: against --url, or on a throwaway Redis that is always stopped after."""
    backend = {"use_uvloop": True}
    if options.url is not None:
        return anyio.run(
            _interruptible, partial(_remote, options), backend="asyncio", backend_options=backend
        )
    with (
        tempfile.TemporaryDirectory(prefix="taskd-bench-") as tmp,
        own_redis(Path(tmp) / "redis") as redis_url,
    ):
        return anyio.run(
            _interruptible,
            partial(_local, options, redis_url, Path(tmp)),
            backend="asyncio",
            backend_options=backend,
        )


async def _interruptible(work: Callable[[], Awaitable[Report]]) -> Report:
    """Run `work`, which a Ctrl-C cancels: KeyboardInterrupt once its clean-up is done.

    asyncio's own Ctrl-C cancels the main task once, and that one cancellation can be lost:
    Python 3.11's wait_for (which redis-py uses to send) drops it when what it waits for
    finishes at the same moment, and the bench would run on. A cancelled anyio scope
    cancels again at every await until its code has left it.
    """
    interrupted = False
    report: Report | None = None
    async with anyio.create_task_group() as tg:

        async def interrupt() -> None:
            nonlocal interrupted
            with anyio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    interrupted = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(interrupt)
        report = await work()
        tg.cancel_scope.cancel()
    if interrupted:
        raise KeyboardInterrupt
    assert report is not None
    return report


async def _local(options: Options, redis_url: str, tmp: Path) -> Report:
    local = Local(redis_url=redis_url, tmp=tmp)
    try:
        async with http_session() as session:
            bench = Bench(session=session, quick=options.quick, local=local, soak=options.soak)
            redis_version = str((await local.inspector.server_info())["version"])
            allocator = await local.inspector.allocator()
            results = await run_rounds(bench, options)
    finally:
        with anyio.CancelScope(shield=True):
            await local.close()
    return Report(machine(redis_version, allocator), results, bench.notes)


async def _remote(options: Options) -> Report:
    assert options.url is not None
    url = options.url.rstrip("/")
    async with http_session(url) as session:
        base = "http://localhost" if url.startswith("unix:") else url
        unix_url = url if url.startswith("unix:") else None
        bench = Bench(session=session, quick=options.quick, url=base, unix_url=unix_url)
        stats = await bench.json("GET", f"{base}/stats")
        if "noop" not in await configured_types(bench, base):
            raise BenchError(f"the daemon at {url} has no `noop` handler; the bench needs one")
        bench.note(f"daemon at {url}; the machine above is the one the bench ran on")
        results = await run_rounds(bench, options)
    redis_version = str(stats.get("redis", {}).get("version"))
    return Report(machine(redis_version), results, bench.notes)
