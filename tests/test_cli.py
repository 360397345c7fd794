"""The command line as users run it: the installed `taskd` script against a real daemon."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from taskd import __version__
from taskd.client import DEFAULT_URL, AddressError, Target, locate
from tests.support import TASKD, DaemonProcess, wait_healthy, wait_until

TOKEN = "a-token-of-24-characters"
HANDLERS = '[handlers.echo]\nbuiltin = "echo"\n\n[handlers.fail]\nbuiltin = "fail"\n'


@dataclass
class Result:
    code: int
    out: str
    err: str


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any TASKD_ variable a developer may have set, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKD_")}
    return {**env, **extra}


async def taskd(*args: str, cwd: Path, **env: str) -> Result:
    """Run the installed console script and collect what it says."""
    done = await anyio.run_process([str(TASKD), *args], cwd=cwd, env=clean_env(**env), check=False)
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def write_config(tmp_path: Path, listen: str, server_extra: str = "") -> Path:
    path = tmp_path / "taskd.toml"
    path.write_text(
        f'[server]\nlisten = "{listen}"\n{server_extra}\n'
        "[workers]\nconcurrency = 4\nheartbeat_interval = 0.5\nshutdown_timeout = 2\n\n" + HANDLERS
    )
    return path


@asynccontextmanager
async def daemon(
    tmp_path: Path, config: Path, redis_url: str, *args: str
) -> AsyncIterator[DaemonProcess]:
    """A daemon process on the test Redis; stopped with SIGTERM, which must exit 0."""
    process = DaemonProcess(
        [*args, "--config", str(config)], cwd=tmp_path, env={"TASKD_REDIS_URL": redis_url}
    )
    try:
        yield process
        process.signal(signal.SIGTERM)
        assert process.wait() == 0, process.output()
    finally:
        process.kill()


@dataclass
class Running:
    url: str
    config: Path
    process: DaemonProcess


@pytest.fixture
async def running(
    tmp_path: Path, redis_url: str, free_port: Callable[[], int]
) -> AsyncIterator[Running]:
    port = free_port()
    config = write_config(tmp_path, f"127.0.0.1:{port}", f'token = "{TOKEN}"')
    async with daemon(tmp_path, config, redis_url) as process:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, process)
        yield Running(url, config, process)


async def test_submit_prints_the_queued_job(running: Running, tmp_path: Path) -> None:
    to_daemon = ("--url", running.url, "--token", TOKEN)
    done = await taskd("submit", "echo", "--payload", '{"x":1}', *to_daemon, cwd=tmp_path)
    assert done.code == 0, done.err
    job = json.loads(done.out)
    assert (job["type"], job["state"], job["payload"]) == ("echo", "queued", {"x": 1})
    assert done.out.startswith('{\n  "')  # pretty, for people

    options = ("--delay", "60", "--max-attempts", "2", "--url", running.url)
    later = await taskd("submit", "echo", *options, cwd=tmp_path, TASKD_TOKEN=TOKEN)
    assert later.code == 0, later.err
    job = json.loads(later.out)
    assert (job["state"], job["max_attempts"], job["payload"]) == ("scheduled", 2, None)


async def test_submit_takes_priority_idempotency_key_and_callback_url(
    running: Running, tmp_path: Path
) -> None:
    env = {"TASKD_URL": running.url, "TASKD_TOKEN": TOKEN}
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    options = ("--priority", "9", "--idempotency-key", "order-42", "--run-at", f"{tomorrow}Z")
    callback = ("--callback-url", "https://example.org/done")
    first = await taskd("submit", "echo", *options, *callback, cwd=tmp_path, **env)
    assert first.code == 0, first.err
    job = json.loads(first.out)
    assert (job["priority"], job["idempotency_key"], job["state"]) == (9, "order-42", "scheduled")
    assert (job["callback_url"], job["run_at"]) == (callback[1], f"{tomorrow}.000Z")
    again = await taskd("submit", "echo", "--idempotency-key", "order-42", cwd=tmp_path, **env)
    assert again.code == 0, again.err
    assert json.loads(again.out)["id"] == job["id"]
    refused = await taskd("submit", "echo", "--priority", "10", cwd=tmp_path, **env)
    assert refused.code == 1
    assert refused.err.startswith("taskd: 422 invalid_job: 'priority' must be an integer from 0")


async def test_submit_with_a_bad_payload_is_a_usage_error_and_sends_nothing(
    running: Running, tmp_path: Path
) -> None:
    done = await taskd(
        "submit", "echo", "--payload", "{x:1}", "--url", running.url, "--token", TOKEN, cwd=tmp_path
    )
    assert done.code == 2
    assert "argument --payload: not valid JSON" in done.err
    assert "{x:1}" in done.err
    stats = await taskd("stats", "--json", "--url", running.url, "--token", TOKEN, cwd=tmp_path)
    assert stats.code == 0, stats.err
    counts = json.loads(stats.out)["queues"]["default"]
    assert counts["queued"] == counts["scheduled"] == counts["completed"] == 0


async def test_submit_shows_the_daemons_error(running: Running, tmp_path: Path) -> None:
    unknown = await taskd("submit", "resize", "--url", running.url, "--token", TOKEN, cwd=tmp_path)
    assert unknown.code == 1
    assert unknown.err == (
        "taskd: 422 unknown_type: unknown job type 'resize'; configured types: echo, fail\n"
    )
    both = await taskd("submit", "echo", "--delay", "1", "--run-at", "0", cwd=tmp_path)
    assert both.code == 2
    assert "not allowed with argument" in both.err


async def test_submit_needs_the_token_the_daemon_has(running: Running, tmp_path: Path) -> None:
    denied = await taskd("submit", "echo", "--url", running.url, cwd=tmp_path)
    assert denied.code == 1
    assert denied.err.startswith("taskd: 401 unauthorized: ")
    # With the URL taken from the config file, its token goes along too.
    allowed = await taskd("submit", "echo", "--config", str(running.config), cwd=tmp_path)
    assert allowed.code == 0, allowed.err


async def test_stats_shows_queues_and_daemons(running: Running, tmp_path: Path) -> None:
    env = {"TASKD_URL": running.url, "TASKD_TOKEN": TOKEN}
    assert (await taskd("submit", "echo", cwd=tmp_path, **env)).code == 0
    stats: dict[str, Any] = {}

    async def completed() -> bool:
        nonlocal stats
        done = await taskd("stats", "--json", cwd=tmp_path, **env)
        assert done.code == 0, done.err
        stats = json.loads(done.out)
        return bool(stats["queues"]["default"]["completed"] == 1)

    await wait_until(completed, "the job to complete")
    assert stats["instances"][0]["pid"] == running.process.proc.pid

    table = await taskd("stats", cwd=tmp_path, **env)
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    # Numbers flush right under their headings.
    assert lines[:2] == [
        "QUEUE    QUEUED  SCHEDULED  ACTIVE  COMPLETED  FAILED  CANCELLED",
        "default       0          0       0          1       0          0",
    ]
    assert lines[3].split() == ["INSTANCE", "HOST", "PID", "ACTIVE"]
    daemon_id, _, pid, busy = lines[4].split()
    assert (daemon_id, pid, busy) == (
        stats["instances"][0]["id"],
        str(running.process.proc.pid),
        "0/4",
    )


async def test_nothing_listening_is_exit_1(tmp_path: Path, free_port: Callable[[], int]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = await taskd("stats", "--url", url, cwd=tmp_path)
    assert done.code == 1
    assert done.err.startswith(f"taskd: cannot reach the daemon at {url}: ")
    assert "refused" in done.err.lower()
    bad = await taskd("stats", "--url", "ftp://example.org", cwd=tmp_path)
    assert (bad.code, bad.err) == (
        2,
        "taskd: not a daemon URL: 'ftp://example.org' (use http://HOST:PORT or unix:/PATH)\n",
    )


async def test_unix_socket_daemon_from_its_config(tmp_path: Path, redis_url: str) -> None:
    config = write_config(tmp_path, f"unix:{tmp_path / 'taskd.sock'}")
    async with daemon(tmp_path, config, redis_url) as process:

        async def answers() -> bool:
            assert process.proc.poll() is None, process.output()
            return (await taskd("stats", "--config", str(config), cwd=tmp_path)).code == 0

        await wait_until(answers, "the daemon on its unix socket")
        # TASKD_CONFIG names the file just as --config does.
        done = await taskd(
            "submit", "echo", "--payload", "[1]", cwd=tmp_path, TASKD_CONFIG=str(config)
        )
        assert done.code == 0, done.err
        assert json.loads(done.out)["payload"] == [1]


async def test_version_and_check(tmp_path: Path) -> None:
    version = await taskd("--version", cwd=tmp_path)
    assert (version.code, version.out) == (0, f"taskd {__version__}\n")
    good = write_config(tmp_path, "127.0.0.1:7700")
    ok = await taskd("check", "--config", str(good), cwd=tmp_path)
    assert (ok.code, ok.out) == (0, f"{good}: ok (2 handlers)\n")
    one = tmp_path / "one.toml"
    one.write_text('[handlers.echo]\nbuiltin = "echo"\n')
    single = await taskd("check", "--config", str(one), cwd=tmp_path)
    assert (single.code, single.out) == (0, f"{one}: ok (1 handler)\n")
    bad = tmp_path / "bad.toml"
    bad.write_text('[workers]\nconcurrency = 0\n\n[handlers.x]\nbuiltin = "nope"\n')
    failed = await taskd("check", "--config", str(bad), cwd=tmp_path)
    assert failed.code == 2
    assert f"{bad}: workers.concurrency: must be an integer from 1 to 100000, got 0" in failed.err
    assert f"{bad}: handlers.x.builtin: unknown builtin 'nope'" in failed.err


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        (["submit", "echo"], "usage: taskd submit [-h] [--url URL]"),
        (["stats"], "usage: taskd stats [-h] [--url URL]"),
        (["check"], "usage: taskd check [-h] [--config CONFIG]"),
        (["run"], "usage: taskd run [-h] [--config CONFIG]"),
    ],
)
async def test_an_unknown_option_shows_its_subcommands_usage(
    tmp_path: Path, command: list[str], usage: str
) -> None:
    done = await taskd(*command, "--bogus", cwd=tmp_path)
    assert done.code == 2
    assert done.err.startswith(usage)
    assert done.err.endswith(f"taskd {command[0]}: error: unrecognized arguments: --bogus\n")


async def test_run_takes_its_config_after_the_subcommand(
    tmp_path: Path, redis_url: str, free_port: Callable[[], int]
) -> None:
    port = free_port()
    config = write_config(tmp_path, f"127.0.0.1:{port}")
    # daemon() puts `--config FILE` after the arguments: here, after `run`.
    async with daemon(tmp_path, config, redis_url, "run") as process:
        await wait_healthy(f"http://127.0.0.1:{port}", process)
    missing = await taskd("run", "--config", str(tmp_path / "none.toml"), cwd=tmp_path)
    assert missing.code == 2
    assert f"{tmp_path / 'none.toml'}: cannot read file" in missing.err


async def test_json_log_format_writes_json_lines(
    tmp_path: Path, redis_url: str, free_port: Callable[[], int]
) -> None:
    port = free_port()
    config = write_config(tmp_path, f"127.0.0.1:{port}")
    async with daemon(tmp_path, config, redis_url, "--log-format", "json") as process:
        await wait_healthy(f"http://127.0.0.1:{port}", process)
    records = [json.loads(line) for line in process.output().splitlines()]
    assert len(records) >= 3
    assert {"time", "level", "logger", "msg"} <= records[0].keys()
    assert any(r["msg"].startswith(f"taskd {__version__} starting") for r in records)
    assert all(r["level"] in ("debug", "info", "warning", "error") for r in records)


async def test_text_log_format_is_the_default(
    tmp_path: Path, redis_url: str, free_port: Callable[[], int]
) -> None:
    port = free_port()
    config = write_config(tmp_path, f"127.0.0.1:{port}")
    async with daemon(tmp_path, config, redis_url) as process:
        await wait_healthy(f"http://127.0.0.1:{port}", process)
    first = process.output().splitlines()[0]
    assert first.startswith("time=")
    assert " level=info logger=taskd.cli msg=" in first


# Where the commands look for the daemon, without one: a pure function of its inputs.


def config_listening(tmp_path: Path, listen: str, extra: str = "") -> str:
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nlisten = "{listen}"\n{extra}\n')
    return str(path)


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:7701", "http://127.0.0.1:7701"),
        ("0.0.0.0:7702", "http://127.0.0.1:7702"),
        ("[::1]:7703", "http://[::1]:7703"),
        ("[::]:7704", "http://[::1]:7704"),
        ("jobs.internal:80", "http://jobs.internal:80"),
        ("unix:/run/taskd/api.sock", "unix:/run/taskd/api.sock"),
    ],
)
def test_url_from_the_config(tmp_path: Path, listen: str, url: str) -> None:
    assert locate(None, None, config_listening(tmp_path, listen), {}) == Target(url)


def test_url_precedence_and_tokens(tmp_path: Path) -> None:
    config = config_listening(tmp_path, "127.0.0.1:7701", f'token = "{TOKEN}"')
    assert locate(None, None, str(tmp_path / "none.toml"), {}) == Target(DEFAULT_URL)
    assert locate(None, None, config, {}) == Target("http://127.0.0.1:7701", TOKEN)
    env = {"TASKD_URL": "http://a:1", "TASKD_TOKEN": "env"}
    # The config's token never goes to a URL that came from elsewhere.
    assert locate(None, None, config, {"TASKD_URL": "http://a:1"}) == Target("http://a:1")
    assert locate(None, None, config, env) == Target("http://a:1", "env")
    assert locate("http://b:2", "flag", config, env) == Target("http://b:2", "flag")


def test_a_port_chosen_at_start_cannot_be_derived(tmp_path: Path) -> None:
    with pytest.raises(AddressError, match="pass --url"):
        locate(None, None, config_listening(tmp_path, "127.0.0.1:0"), {})
