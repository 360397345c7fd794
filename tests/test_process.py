"""taskd as users run it: real daemon processes, started as the README says, stopped by signals."""

from __future__ import annotations

import re
import signal
import socket
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from redis.asyncio import Redis

from taskd.jobs import format_ms
from taskd.store import Keys
from tests.builders import shipped_config, write_daemon_config
from tests.support import (
    REPO,
    TASKD,
    DaemonProcess,
    get_json,
    post_json,
    ready_ids,
    submit_in_turn,
    wait_for_state,
    wait_healthy,
    wait_until,
)
from tests.test_docs import blocks_named, user_env

K = Keys("taskd")


async def test_readme_walkthrough_on_the_embedded_redis(tmp_path: Path, free_port: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = shipped_config(tmp_path, port)
    daemon = DaemonProcess(["--config", str(config)], cwd=tmp_path)
    try:
        await wait_healthy(url, daemon)
        async with aiohttp.ClientSession() as session:
            status, job = await post_json(
                session, f"{url}/jobs", {"type": "echo", "payload": {"x": 1}}
            )
            assert (status, job["state"]) == (201, "queued")
            done = await wait_for_state(session, url, job["id"], {"completed", "failed"})
            assert (done["state"], done["result"]) == ("completed", {"x": 1})
            _, stats = await get_json(session, f"{url}/stats")
            assert stats["queues"]["default"]["completed"] == 1
            assert [i["pid"] for i in stats["instances"]] == [daemon.proc.pid]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.output()
    finally:
        daemon.kill()
    # The embedded Redis lived under ./var of the working directory, with AOF on (a file
    # up to Redis 6.2, a directory from Redis 7, whichever redis-server is on PATH).
    var = tmp_path / "var"
    assert (var / "appendonly.aof").exists() or (var / "appendonlydir").is_dir()
    assert "stopped redis-server" in daemon.output()

    # Started again, the daemon finds the job it completed before: it was persisted.
    again = DaemonProcess(["--config", str(config)], cwd=tmp_path)
    try:
        await wait_healthy(url, again)
        async with aiohttp.ClientSession() as session:
            _, found = await get_json(session, f"{url}/jobs/{job['id']}")
        assert found["result"] == {"x": 1}
        again.signal(signal.SIGINT)
        assert again.wait() == 0, again.output()
    finally:
        again.kill()


async def test_bad_config_stops_startup_with_file_key_and_problem(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text(
        '[workers]\nconcurrency = 0\n\n[handlers.echo]\nbuiltin = "echo"\ncolour = 1\n'
    )
    daemon = DaemonProcess(["--config", str(config)], cwd=tmp_path)
    try:
        assert daemon.wait() == 2
    finally:
        daemon.kill()
    output = daemon.output()
    assert f"{config}: workers.concurrency: must be an integer from 1 to 100000, got 0" in output
    assert f"{config}: handlers.echo.colour: unknown key" in output


def daemon_config(tmp_path: Path, name: str, port: int) -> Path:
    workers = {"concurrency": 8, "shutdown_timeout": 10, "heartbeat_interval": 0.5}
    return write_daemon_config(
        tmp_path / f"{name}.toml", port, workers=workers, handlers={"sleep": {"builtin": "sleep"}}
    )


async def test_two_daemons_share_work_and_sigterm_loses_nothing(
    tmp_path: Path, free_port: Any, redis_url: str, redis: Redis
) -> None:
    env = {"TASKD_REDIS_URL": redis_url}
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    daemons = [
        DaemonProcess(["--config", str(daemon_config(tmp_path, f"d{i}", p))], cwd=tmp_path, env=env)
        for i, p in enumerate(ports)
    ]
    total = 200
    try:
        for url, daemon in zip(urls, daemons, strict=True):
            await wait_healthy(url, daemon)
        async with aiohttp.ClientSession() as session:
            for n in range(total):
                status, _ = await post_json(
                    session, f"{urls[n % 2]}/jobs", {"type": "sleep", "payload": {"seconds": 0.05}}
                )
                assert status == 201

            async def some_done() -> bool:
                return await redis.zcard(K.completed("default")) >= 40

            await wait_until(some_done, "40 jobs completed")
            # Stop one daemon under load: it drains or requeues, and the other finishes.
            daemons[0].signal(signal.SIGTERM)
            assert daemons[0].wait() == 0, daemons[0].output()

            async def all_done() -> bool:
                return await redis.zcard(K.completed("default")) == total

            await wait_until(all_done, f"{total} jobs completed")
    finally:
        for daemon in daemons:
            daemon.kill()
    assert len(await ready_ids(redis, "default")) == 0
    assert await redis.zcard(K.failed("default")) == 0
    ran_by = {
        await redis.hget(K.job("default", i.decode()), "daemon")
        for i in await redis.zrange(K.completed("default"), 0, -1)
    }
    assert len(ran_by) == 2


async def test_daemon_tells_systemd_it_is_ready_and_stopping(
    tmp_path: Path, free_port: Any, redis_url: str
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(20)
    env = {
        "TASKD_REDIS_URL": redis_url,
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "2000000",
    }
    port = free_port()
    daemon = DaemonProcess(
        ["--config", str(daemon_config(tmp_path, "d", port))], cwd=tmp_path, env=env
    )
    try:
        messages = _until(sock, b"READY=1")
        assert any(m.startswith(b"WATCHDOG=1") for m in messages)
        await wait_healthy(f"http://127.0.0.1:{port}", daemon)  # ready means serving
        daemon.signal(signal.SIGTERM)
        assert b"STOPPING=1" in _until(sock, b"STOPPING=1")[-1]
        assert daemon.wait() == 0
    finally:
        daemon.kill()
        sock.close()


def _until(sock: socket.socket, marker: bytes) -> list[bytes]:
    """Datagrams received up to and including the first that contains `marker`."""
    messages = [sock.recv(4096)]
    while marker not in messages[-1]:
        messages.append(sock.recv(4096))
    return messages


async def test_exec_programs_that_ignore_stdin_complete_in_a_real_daemon(
    tmp_path: Path, free_port: Any, redis_url: str, redis: Redis
) -> None:
    """The daemon process runs on uvloop and its workers keep the loop busy: the case in
    which a program used to exit before its stdin was written, and its job fail."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "exec.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n\n[workers]\nconcurrency = 20\n\n'
        '[handlers.t]\nexec = ["/bin/true"]\n'
    )
    daemon = DaemonProcess(
        ["--config", str(config)], cwd=tmp_path, env={"TASKD_REDIS_URL": redis_url}
    )
    small, large = (
        {"type": "t", "payload": {"x": 1}},
        {"type": "t", "payload": {"x": "a" * 100_000}},
    )
    total = 220
    try:
        await wait_healthy(url, daemon)
        async with aiohttp.ClientSession() as session:
            status, body = await post_json(session, f"{url}/jobs/batch", {"jobs": [small] * 200})
            assert status == 201, body
            for _ in range(20):
                status, body = await post_json(session, f"{url}/jobs", large)
                assert status == 201, body

            async def all_ended() -> bool:
                ended = [
                    await redis.zcard(K.completed("default")),
                    await redis.zcard(K.failed("default")),
                ]
                return sum(ended) == total

            await wait_until(all_ended, f"{total} jobs to end")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.output()
    finally:
        daemon.kill()
    assert await redis.zcard(K.completed("default")) == total


# A handler that answers the Job attributes its payload names, as it sees them.
_PROBE = """
def attributes(job):
    return {name: getattr(job, name) for name in job.payload}
"""


def documented_job_attributes() -> list[str]:
    """The attributes the table under "**The job.**" of docs/configuration.md lists."""
    text = (REPO / "docs" / "configuration.md").read_text()
    table = text.split("**The job.**", 1)[1].split("\n\n", 2)[1]
    return re.findall(r"(?m)^\| `(\w+)` \|", table)


def python_handlers_beside(etc: Path, port: int) -> Path:
    """The documented Python handlers (their config and module) in `etc`, as under
    /etc/taskd, and a probe handler in a [workers] python_path directory; the config."""
    [config] = blocks_named("config", "python-handlers")
    [module] = blocks_named("config", "python-handlers-module")
    (etc / "myapp").mkdir(parents=True)
    (etc / "myapp" / "__init__.py").write_text("")
    (etc / "myapp" / "jobs.py").write_text(module.body + "\n")
    (etc / "lib").mkdir()
    (etc / "lib" / "probe.py").write_text(_PROBE)
    path = etc / "taskd.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n\n[workers]\npython_path = ["lib"]\n\n'
        f'{config.body}\n\n[handlers.probe]\npython = "probe:attributes"\n'
    )
    return path


async def test_python_handlers_beside_the_config_run_without_pythonpath(
    tmp_path: Path, free_port: Any, redis_url: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = python_handlers_beside(tmp_path / "etc", port)
    # Elsewhere, and with nothing on PYTHONPATH (empty is as unset): only the config's
    # directory can lead to myapp.
    (elsewhere := tmp_path / "run").mkdir()
    env = {"TASKD_REDIS_URL": redis_url, "PYTHONPATH": ""}
    checked = await anyio.run_process(
        [str(TASKD), "check", "--config", str(config)],
        cwd=elsewhere,
        env={**user_env(), **env},
        check=False,
    )
    assert (checked.returncode, checked.stdout.decode()) == (
        0,
        f"{config}: ok (3 handlers)\n",
    ), checked.stderr
    daemon = DaemonProcess(["--config", str(config)], cwd=elsewhere, env=env)
    try:
        await wait_healthy(url, daemon)
        async with aiohttp.ClientSession() as session:
            jobs = {}
            for name, body in {
                "resized": {"type": "resize", "payload": {"width": 640}},
                "refused": {"type": "resize", "payload": {"width": "wide"}},
                "thumbnail": {"type": "thumbnail", "payload": "a.png"},
                "probe": {"type": "probe", "payload": documented_job_attributes()},
            }.items():
                status, job = await post_json(session, f"{url}/jobs", body)
                assert status == 201, job
                jobs[name] = await wait_for_state(session, url, job["id"], {"completed", "failed"})
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.output()
    finally:
        daemon.kill()
    resized, refused, thumbnail = jobs["resized"], jobs["refused"], jobs["thumbnail"]
    assert (resized["state"], resized["result"]) == ("completed", {"width": 320, "attempt": 1})
    assert (resized["progress"]["value"], resized["progress"]["message"]) == (50, "half way")
    assert (refused["state"], refused["attempts"]) == ("failed", 1)
    assert refused["error"] == "payload.width must be an integer, got 'wide'"
    assert (thumbnail["state"], thumbnail["result"]) == ("completed", "thumbnail of a.png")
    assert (thumbnail["progress"]["value"], thumbnail["progress"]["message"]) == (100, "done")
    probe = jobs["probe"]
    assert probe["state"] == "completed", probe
    expected = {
        "id": probe["id"],
        "type": "probe",
        "queue": "default",
        "payload": documented_job_attributes(),
        "attempts": 1,
        "max_attempts": 3,
        "attempt_number": 1,
        "created_at": probe["created_at"],
        "started_at": probe["started_at"],
        "daemon": probe["daemon"],
        "callback_url": None,
    }
    seen = dict(probe["result"])
    for field in ("created_at", "started_at"):
        seen[field] = format_ms(seen[field])
    assert seen == {name: expected[name] for name in documented_job_attributes()}
    assert set(documented_job_attributes()) == set(expected)


def test_a_handler_module_nowhere_to_be_found_stops_startup(tmp_path: Path) -> None:
    config = tmp_path / "taskd.toml"
    config.write_text('[handlers.resize]\npython = "nowhere_app.jobs:resize"\n')
    daemon = DaemonProcess(["--config", str(config)], cwd=tmp_path, env={"PYTHONPATH": ""})
    try:
        assert daemon.wait() == 2
    finally:
        daemon.kill()
    assert (
        f"{config}: handlers.resize.python: cannot import module 'nowhere_app.jobs': No module "
        "named 'nowhere_app' (looked in the config file's directory" in daemon.output()
    )


async def test_a_second_daemon_shares_the_first_ones_embedded_redis(
    tmp_path: Path, free_port: Any
) -> None:
    """README's scaling out: the first daemon's embedded Redis on TCP, the second started
    by the documented command; both take jobs, and the second waits out the first's stop."""
    [first_redis] = blocks_named("config", "scale-out")
    [command] = blocks_named("test", "scale-out")
    redis_port, ports = free_port(), [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    redis_section = tomllib.loads(first_redis.body.replace("6390", str(redis_port)))["redis"]
    workers = {"concurrency": 2, "heartbeat_interval": 0.5, "shutdown_timeout": 10}
    handlers = {"sleep": {"builtin": "sleep"}}
    (first_dir := tmp_path / "first").mkdir()
    first_config = write_daemon_config(
        first_dir / "taskd.toml", ports[0], redis=redis_section, workers=workers, handlers=handlers
    )
    write_daemon_config(first_dir / "second.toml", ports[1], workers=workers, handlers=handlers)
    line = command.body.replace("6390", str(redis_port)).replace(".venv/bin/", f"{TASKD.parent}/")
    first = DaemonProcess(["--config", str(first_config)], cwd=first_dir)
    second: DaemonProcess | None = None
    try:
        await wait_healthy(urls[0], first)
        assert (
            f"listens for other daemons at redis://***@127.0.0.1:{redis_port}/0" in first.output()
        )
        second = DaemonProcess([line], cwd=first_dir, env=user_env(), shell=True)
        await wait_healthy(urls[1], second)
        assert "starting with Redis at redis://***@127.0.0.1:" in second.output()
        async with aiohttp.ClientSession() as session:
            sleep = {"type": "sleep", "payload": {"seconds": 0.2}}
            ids = await submit_in_turn(session, urls, sleep, 16)
            done = [await wait_for_state(session, urls[1], i, {"completed"}) for i in ids]
            _, stats = await get_json(session, f"{urls[0]}/stats")
            assert {i["pid"] for i in stats["instances"]} == {first.proc.pid, second.proc.pid}
            assert {job["daemon"] for job in done} == {i["id"] for i in stats["instances"]}

            # The first one stops, and its Redis with it: the second runs on, answering 503.
            first.signal(signal.SIGTERM)
            assert first.wait() == 0, first.output()

            async def unavailable() -> bool:
                async with session.get(f"{urls[1]}/health") as response:
                    return response.status == 503

            await wait_until(unavailable, "the second daemon to find Redis gone")
            assert second.proc.poll() is None
            status, _ = await post_json(session, f"{urls[1]}/jobs", sleep)
            assert status == 503

            # Back, with every job it had: the second resumes by itself.
            first = DaemonProcess(["--config", str(first_config)], cwd=first_dir)
            await wait_healthy(urls[0], first)
            await wait_healthy(urls[1], second)
            more = await submit_in_turn(session, [urls[1]], sleep, 4)
            for job_id in [*ids, *more]:
                await wait_for_state(session, urls[1], job_id, {"completed"})
            assert second.proc.poll() is None
        for daemon in (second, first):
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0, daemon.output()
    finally:
        first.kill()
        if second is not None:
            second.kill()


async def test_embedded_data_of_a_newer_redis_stops_startup(tmp_path: Path, free_port: Any) -> None:
    """A Redis 7 append-only directory in data_dir, and only the bundled Redis 6.2 to
    read it (which would ignore it and start empty): taskd refuses to start."""
    manifest = tmp_path / "var" / "appendonlydir" / "appendonly.aof.manifest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("file appendonly.aof.1.base.rdb seq 1 type b\n")
    (manifest.parent / "appendonly.aof.1.base.rdb").write_bytes(b"REDIS0011\xfa")
    config = shipped_config(tmp_path, free_port())
    # No redis-server on PATH: the one the embedded extra bundles is used.
    daemon = DaemonProcess(["--config", str(config)], cwd=tmp_path, env={"PATH": str(TASKD.parent)})
    try:
        assert daemon.wait() == 1
    finally:
        daemon.kill()
    output = daemon.output()
    assert "cannot start the embedded Redis" in output
    assert f"{tmp_path}/var/appendonlydir/ is the append-only file of Redis 7.0" in output
    assert not (tmp_path / "var" / "appendonly.aof").exists()  # nothing written beside it
