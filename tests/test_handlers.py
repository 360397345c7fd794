"""Tests of taskd.handlers: builtin, python, exec and http handlers, limits, timeouts."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import os
import pickle
import socket
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
import uvloop
from aiohttp import web
from yarl import URL

from taskd.config import ConfigError, HandlerConfig, parse
from taskd.egress import DEFAULT_POLICY, Policy
from taskd.handlers import MAX_OUTPUT, STDERR_TAIL, Handlers, JobFailed
from taskd.jobs import ACTIVE, Job
from tests import handler_funcs
from tests.builders import new_job
from tests.support import children, is_gone, read_pids

PROGRAMS = Path(__file__).parent / "programs"
FUNCS = "tests.handler_funcs"
HERE = "tests.test_handlers"  # for python handlers defined below
# The test servers listen on 127.0.0.1, which the default policy refuses.
LOOPBACK = Policy(allow=(ipaddress.ip_network("127.0.0.0/8"),))


def make_job(
    job_type: str, payload: Any = None, *, job_id: str = "job-1", attempts: int = 1
) -> Job:
    """A job as a worker runs it: claimed, on its `attempts`-th attempt."""
    return new_job(
        job_type, payload, id=job_id, state=ACTIVE, attempts=attempts, created_at=0, max_attempts=1
    )


def program(name: str, *args: str) -> tuple[str, ...]:
    return (str(PROGRAMS / name), *args)


async def run_job(handlers: Handlers, job: Job) -> Any:
    """Run a job within its handler's timeout; a run cut short by it is JobFailed. (The
    worker pool's own way of cutting it short is tested in test_pool.py.)"""
    with anyio.move_on_after(handlers.timeout_of(job)):
        return orjson.loads(await handlers.run(job))
    raise handlers.timed_out(job)


async def run_one(config: HandlerConfig, payload: Any = None, egress: Policy = LOOPBACK) -> Any:
    async with Handlers({config.name: config}, egress=egress) as handlers:
        return await run_job(handlers, make_job(config.name, payload))


async def failure(
    config: HandlerConfig, payload: Any = None, egress: Policy = LOOPBACK
) -> JobFailed:
    with pytest.raises(JobFailed) as info:
        await run_one(config, payload, egress)
    return info.value


async def fails_with(config: HandlerConfig, payload: Any = None) -> str:
    return str(await failure(config, payload))


async def wait_for(condition: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    """Poll until condition() holds; fail the test after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"gave up after {deadline} s waiting for {what}")
        await anyio.sleep(0.02)


# ---------------------------------------------------------------- general


def test_job_failed_is_retryable_unless_marked_permanent() -> None:
    assert not JobFailed("flaky").permanent
    error = JobFailed("bad input", permanent=True)
    assert (str(error), error.permanent) == ("bad input", True)
    with pytest.raises(TypeError):
        JobFailed("bad input", True)  # type: ignore[call-arg]


def test_job_failed_pickles_with_its_flag() -> None:
    copy = pickle.loads(pickle.dumps(JobFailed("bad input", permanent=True)))
    assert (str(copy), copy.permanent) == ("bad input", True)


async def test_unknown_type_fails_for_good() -> None:
    async with Handlers({}) as handlers:
        with pytest.raises(JobFailed) as info:
            await run_job(handlers, make_job("nope"))
    assert str(info.value) == "no handler for type 'nope' in this daemon's config"
    assert info.value.permanent


async def test_cancellation_propagates_not_job_failed() -> None:
    config = HandlerConfig(name="s", kind="builtin", builtin="sleep", timeout=60)
    async with Handlers({"s": config}) as handlers:
        with anyio.move_on_after(0.2) as scope:
            await run_job(handlers, make_job("s", {"seconds": 30}))
    assert scope.cancelled_caught


# ---------------------------------------------------------------- builtin


async def test_builtin_echo_returns_payload() -> None:
    payload = {"a": [1, 2, {"b": None}], "s": "ü"}
    assert (
        await run_one(HandlerConfig(name="e", kind="builtin", builtin="echo"), payload) == payload
    )


async def test_builtin_noop_returns_none() -> None:
    assert await run_one(HandlerConfig(name="n", kind="builtin", builtin="noop"), {"x": 1}) is None


async def test_builtin_sleep_sleeps() -> None:
    config = HandlerConfig(name="s", kind="builtin", builtin="sleep")
    start = time.monotonic()
    assert await run_one(config, {"seconds": 0.2}) is None
    assert time.monotonic() - start >= 0.19
    assert await run_one(config, {"seconds": 0}) is None


@pytest.mark.parametrize(
    "payload", [None, {}, {"seconds": -1}, {"seconds": "1"}, {"seconds": True}, [1], 3]
)
async def test_builtin_sleep_rejects_bad_payload(payload: Any) -> None:
    error = await failure(HandlerConfig(name="s", kind="builtin", builtin="sleep"), payload)
    assert str(error).startswith('builtin sleep needs a payload like {"seconds": 1.5}')
    assert error.permanent


async def test_builtin_fail_with_message() -> None:
    config = HandlerConfig(name="f", kind="builtin", builtin="fail")
    error = await failure(config, {"message": "it broke"})
    assert (str(error), error.permanent) == ("it broke", False)


@pytest.mark.parametrize("payload", [None, {}, {"message": 42}, "just a string"])
async def test_builtin_fail_without_message(payload: Any) -> None:
    config = HandlerConfig(name="f", kind="builtin", builtin="fail")
    error = await failure(config, payload)
    assert (str(error), error.permanent) == ("failed on purpose (builtin fail)", False)


async def test_builtin_fail_permanent() -> None:
    config = HandlerConfig(name="f", kind="builtin", builtin="fail")
    error = await failure(config, {"permanent": True})
    assert (str(error), error.permanent) == ("failed on purpose (builtin fail)", True)
    error = await failure(config, {"message": "it broke for good", "permanent": True})
    assert (str(error), error.permanent) == ("it broke for good", True)


@pytest.mark.parametrize(
    "payload", [{"permanent": False}, {"permanent": 1}, {"permanent": "true"}, ["permanent"]]
)
async def test_builtin_fail_permanent_only_when_true(payload: Any) -> None:
    # Only JSON true counts: a truthy stand-in is more likely a mistake than a wish.
    config = HandlerConfig(name="f", kind="builtin", builtin="fail")
    assert not (await failure(config, payload)).permanent


async def test_timeout_fails_the_job_retryably() -> None:
    config = HandlerConfig(name="s", kind="builtin", builtin="sleep", timeout=0.2)
    error = await failure(config, {"seconds": 30})
    assert (str(error), error.permanent) == ("timed out after 0.2 s", False)


# ---------------------------------------------------------------- python


async def test_python_async_function() -> None:
    config = HandlerConfig(name="p", kind="python", python=f"{FUNCS}:add")
    assert await run_one(config, {"a": 2, "b": 3}) == {"sum": 5}


async def test_python_sync_function_runs_in_a_worker_thread() -> None:
    config = HandlerConfig(name="p", kind="python", python=f"{FUNCS}:where_am_i")
    assert await run_one(config) == {"in_worker_thread": True}


@pytest.mark.parametrize(
    ("func", "error"),
    [
        ("explode", "ValueError: bad input"),
        ("explode_sync", "KeyError: 'missing'"),
        # A handler's own TimeoutError is an error like any other, not our timeout.
        ("own_timeout", "TimeoutError: upstream took too long"),
        ("fail_cleanly", "a message of the handler's own"),
    ],
)
async def test_python_raising(func: str, error: str) -> None:
    config = HandlerConfig(name="p", kind="python", python=f"{FUNCS}:{func}")
    failed = await failure(config)
    assert (str(failed), failed.permanent) == (error, False)


async def fail_for_good(job: Job) -> None:
    raise JobFailed("bad input", permanent=True)


def fail_for_good_sync(job: Job) -> None:
    raise JobFailed("bad input, in a thread", permanent=True)


@pytest.mark.parametrize(
    ("func", "error"),
    [("fail_for_good", "bad input"), ("fail_for_good_sync", "bad input, in a thread")],
)
async def test_python_permanent_failure_passes_through(func: str, error: str) -> None:
    config = HandlerConfig(name="p", kind="python", python=f"{HERE}:{func}")
    failed = await failure(config)
    assert (str(failed), failed.permanent) == (error, True)


async def test_python_result_not_json_fails_for_good() -> None:
    config = HandlerConfig(name="p", kind="python", python=f"{FUNCS}:not_json")
    error = await failure(config)
    assert str(error).startswith("handler returned a result that is not JSON: ")
    assert error.permanent


async def test_python_sync_timeout_does_not_wait_for_the_thread() -> None:
    config = HandlerConfig(name="p", kind="python", python=f"{FUNCS}:blocking", timeout=0.3)
    handler_funcs.RELEASE.clear()
    try:
        assert await fails_with(config) == "timed out after 0.3 s"
    finally:
        handler_funcs.RELEASE.set()  # let the abandoned thread finish


async def test_python_unresolvable_is_refused_at_construction() -> None:
    with pytest.raises(AttributeError):
        Handlers({"p": HandlerConfig(name="p", kind="python", python=f"{FUNCS}:no_such")})
    with pytest.raises(ValueError, match=r"package\.module:function"):
        Handlers({"p": HandlerConfig(name="p", kind="python", python=FUNCS)})


# ---------------------------------------------------------------- exec


async def test_exec_json_stdout_from_stdin_payload() -> None:
    payload = {"numbers": [1, 2.5], "text": "héllo", "nested": {"ok": True}}
    config = HandlerConfig(name="x", kind="exec", exec=program("echo_stdin.py"))
    assert await run_one(config, payload) == payload


async def test_exec_text_stdout() -> None:
    config = HandlerConfig(name="x", kind="exec", exec=program("say.py", "hello", "world"))
    assert await run_one(config) == "hello world"


async def test_exec_empty_stdout_is_none() -> None:
    assert await run_one(HandlerConfig(name="x", kind="exec", exec=program("say.py"))) is None


# What a daemon's environment may well hold that its programs must not see.
SECRETS = {"TASKD_REDIS_URL": "redis://:secret@host/0", "SECRET_TOKEN": "x"}
JOB_VARS = {
    "TASKD_JOB_ID": "j-42",
    "TASKD_JOB_TYPE": "show",
    "TASKD_QUEUE": "q1",
    "TASKD_ATTEMPT": "3",
}


def daemon_env(monkeypatch: pytest.MonkeyPatch, **env: str | None) -> None:
    """Set (or, for None, unset) variables of this process, the daemon of these tests."""
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


async def program_env(config: HandlerConfig) -> dict[str, str]:
    """The whole environment show_env.py is started with, as a job of config's type."""
    async with Handlers({config.name: config}) as handlers:
        job = new_job(
            config.name,
            id="j-42",
            queue="q1",
            state=ACTIVE,
            attempts=3,
            created_at=0,
            max_attempts=1,
        )
        env = await run_job(handlers, job)
    assert isinstance(env, dict)
    return env


# Run by this interpreter, not by "#!/usr/bin/env python3": that may find a wrapper (a pyenv
# shim) that adds variables of its own, and these tests check the environment exactly.
SHOW_ENV = (sys.executable, str(PROGRAMS / "show_env.py"))


def show_env(**settings: Any) -> HandlerConfig:
    return HandlerConfig(name="show", kind="exec", exec=SHOW_ENV, **settings)


async def test_exec_environment_is_minimal(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_env(
        monkeypatch,
        **SECRETS,
        TASKD_FROM_PARENT="not inherited either",
        HOME="/home/taskd",
        LANG="C.UTF-8",
        TZ="Europe/Paris",
        LC_ALL=None,
    )
    assert await program_env(show_env()) == {
        "PATH": os.environ["PATH"],
        "HOME": "/home/taskd",
        "LANG": "C.UTF-8",
        "TZ": "Europe/Paris",
        **JOB_VARS,
    }


async def test_exec_environment_has_a_path_when_the_daemon_has_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon_env(monkeypatch, PATH=None)
    assert (await program_env(show_env()))["PATH"] == os.defpath


async def test_exec_env_and_pass_env_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_env(monkeypatch, **SECRETS, NOT_SET_HERE=None)
    text = f"""
        [handlers.show]
        exec = {json.dumps(SHOW_ENV)}
        env = {{ A = "1", EMPTY = "" }}
        pass_env = ["SECRET_TOKEN", "NOT_SET_HERE"]
    """
    config = parse(tomllib.loads(text), env={}).handlers["show"]
    env = await program_env(config)
    assert (env["A"], env["EMPTY"], env["SECRET_TOKEN"]) == ("1", "", "x")
    assert "NOT_SET_HERE" not in env  # asked for, but the daemon has none to pass on
    assert "TASKD_REDIS_URL" not in env
    assert {name: env[name] for name in JOB_VARS} == JOB_VARS


async def test_exec_env_wins_over_the_base_and_pass_env(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_env(monkeypatch, LANG="C.UTF-8", OTHER="from the daemon")
    config = show_env(env=(("LANG", "C"), ("OTHER", "from the config")), pass_env=("OTHER",))
    env = await program_env(config)
    assert (env["LANG"], env["OTHER"]) == ("C", "from the config")


async def test_exec_job_variables_win_over_env() -> None:
    # The config refuses TASKD_* names; a HandlerConfig made in code still cannot fake them.
    config = show_env(env=(("TASKD_JOB_ID", "fake"), ("TASKD_ATTEMPT", "1")))
    env = await program_env(config)
    assert {name: env[name] for name in JOB_VARS} == JOB_VARS


def test_exec_job_variables_in_env_are_refused_at_load() -> None:
    text = f'[handlers.show]\nexec = {json.dumps(SHOW_ENV)}\nenv = {{ TASKD_JOB_ID = "x" }}\n'
    with pytest.raises(ConfigError) as info:
        parse(tomllib.loads(text), env={})
    (problem,) = info.value.problems
    assert problem.startswith("handlers.show.env.TASKD_JOB_ID: reserved name 'TASKD_JOB_ID'")


async def test_exec_nonzero_exit_with_stderr_tail() -> None:
    config = HandlerConfig(name="x", kind="exec", exec=program("fail_with.py", "3"))
    failed = await failure(config)
    error = str(failed)
    assert error.startswith("exit status 3: ")
    assert error.endswith("noise \nthe real reason")
    assert len(error) <= len("exit status 3: ") + STDERR_TAIL
    assert not failed.permanent


def exit_config(code: int, permanent: tuple[int, ...]) -> HandlerConfig:
    argv = program("fail_with.py", str(code))
    return HandlerConfig(name="x", kind="exec", exec=argv, permanent_exit_codes=permanent)


async def test_exec_listed_exit_code_fails_for_good() -> None:
    failed = await failure(exit_config(65, permanent=(64, 65)))
    assert str(failed).startswith("exit status 65 (permanent): ")
    assert str(failed).endswith("the real reason")
    assert failed.permanent


async def test_exec_unlisted_exit_code_is_retryable() -> None:
    failed = await failure(exit_config(75, permanent=(64, 65)))
    assert str(failed).startswith("exit status 75: ")
    assert not failed.permanent


async def test_exec_killed_by_signal() -> None:
    failed = await failure(HandlerConfig(name="x", kind="exec", exec=program("kill_self.py")))
    assert (str(failed), failed.permanent) == ("killed by signal SIGKILL", False)


async def test_exec_signal_is_not_an_exit_code() -> None:
    # 9 is SIGKILL's number, but a death by signal is no exit: it stays retryable.
    argv = program("kill_self.py")
    config = HandlerConfig(name="x", kind="exec", exec=argv, permanent_exit_codes=(9, 137))
    failed = await failure(config)
    assert (str(failed), failed.permanent) == ("killed by signal SIGKILL", False)


async def test_exec_stdout_is_capped_but_drained() -> None:
    size = MAX_OUTPUT * 3
    config = HandlerConfig(name="x", kind="exec", exec=program("big_output.py", str(size)))
    result = await run_one(config)
    assert isinstance(result, str)
    assert result.startswith("a" * MAX_OUTPUT)
    assert result[MAX_OUTPUT:] == f"\n[output truncated at {MAX_OUTPUT} bytes]"


async def test_exec_program_not_reading_stdin() -> None:
    config = HandlerConfig(name="x", kind="exec", exec=program("ignore_stdin.py"))
    assert await run_one(config, {"big": "x" * MAX_OUTPUT}) == "ok"


async def test_exec_missing_program() -> None:
    config = HandlerConfig(name="x", kind="exec", exec=(str(PROGRAMS / "no_such_program"),))
    assert (await fails_with(config)).startswith("FileNotFoundError: ")


async def run_spawner(
    handlers: Handlers, pid_file: Path, *, cancel: bool
) -> tuple[list[str], int, int]:
    """Run spawn_and_sleep.py as a job; once it wrote its pids, cancel it or let it end.

    Returns the job's errors and the pids of the program and of its grandchild.
    """
    errors: list[str] = []

    async def run() -> None:
        try:
            await run_job(handlers, make_job("spawn"))
        except JobFailed as exc:
            errors.append(str(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for(pid_file.exists, "the program to write its pid file")
        if cancel:
            tg.cancel_scope.cancel()
    child, grandchild = read_pids(pid_file)
    return errors, child, grandchild


def spawner_config(pid_file: Path, timeout: float) -> HandlerConfig:
    argv = program("spawn_and_sleep.py", str(pid_file))
    return HandlerConfig(name="spawn", kind="exec", exec=argv, timeout=timeout)


async def test_exec_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    # Long enough for the program and its grandchild to start on a loaded machine.
    async with Handlers({"spawn": spawner_config(pid_file, timeout=3)}) as handlers:
        errors, child, grandchild = await run_spawner(handlers, pid_file, cancel=False)
    assert errors == ["timed out after 3 s"]
    assert is_gone(child)  # reaped before the job failed
    await wait_for(lambda: is_gone(grandchild), "the grandchild to die", deadline=10)


async def test_exec_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    async with Handlers({"spawn": spawner_config(pid_file, timeout=60)}) as handlers:
        errors, child, grandchild = await run_spawner(handlers, pid_file, cancel=True)
    assert errors == []  # cancelled, not failed
    assert is_gone(child)  # reaped before cancellation went on
    await wait_for(lambda: is_gone(grandchild), "the grandchild to die", deadline=10)


def test_exec_under_uvloop(tmp_path: Path) -> None:
    """The daemon runs on uvloop: exec, cancellation and the group kill work there too."""
    pid_file = tmp_path / "pids"
    configs = {
        "x": HandlerConfig(name="x", kind="exec", exec=program("echo_stdin.py")),
        "spawn": spawner_config(pid_file, timeout=60),
    }

    async def main() -> Any:
        async with Handlers(configs) as handlers:
            echoed = await run_job(handlers, make_job("x", {"k": [1, 2]}))
            errors, child, grandchild = await run_spawner(handlers, pid_file, cancel=True)
        assert errors == []
        assert is_gone(child)
        await wait_for(lambda: is_gone(grandchild), "the grandchild to die", deadline=10)
        return echoed

    assert uvloop.run(main()) == {"k": [1, 2]}


# ------------------------------------------------- exec: programs that leave stdin unread
# The daemon runs on uvloop, whose pipes fail differently from asyncio's when the program
# has already gone, and the race is timing-dependent: so each runs on both, many times.

LOOPS = pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
SMALL = {"x": 1}
LARGE = {"x": "a" * 100_000}  # more than a pipe holds: the write blocks until read


def sh(script: str, name: str = "x", timeout: float = 60) -> HandlerConfig:
    return HandlerConfig(name=name, kind="exec", exec=("/bin/sh", "-c", script), timeout=timeout)


def on_loop(use_uvloop: bool, main: Callable[[], Any]) -> Any:
    return anyio.run(main, backend_options={"use_uvloop": use_uvloop})


async def outcomes(config: HandlerConfig, payloads: list[Any], at_once: int = 20) -> list[Any]:
    """Each payload run as a job, `at_once` at a time as the worker pool runs them (a busy
    loop is what lets a program exit before its stdin is written): each one's result, or
    the text of its JobFailed, in order."""
    found: list[Any] = [None] * len(payloads)
    limiter = anyio.CapacityLimiter(at_once)

    async def run(n: int, handlers: Handlers) -> None:
        async with limiter:
            try:
                found[n] = await run_job(handlers, make_job(config.name, payloads[n]))
            except JobFailed as exc:
                found[n] = f"failed: {exc}"

    handlers = Handlers({config.name: config}, egress=LOOPBACK)
    async with handlers, anyio.create_task_group() as tg:
        for n in range(len(payloads)):
            tg.start_soon(run, n, handlers)
    return found


@LOOPS
def test_exec_program_that_never_reads_stdin_completes(use_uvloop: bool) -> None:
    config = HandlerConfig(name="x", kind="exec", exec=("/bin/true",))

    async def main() -> list[Any]:
        return await outcomes(config, [SMALL] * 200 + [LARGE] * 20)

    assert on_loop(use_uvloop, main) == [None] * 220


@LOOPS
def test_exec_program_that_reads_half_its_stdin_completes(use_uvloop: bool) -> None:
    config = sh("head -c 50000 >/dev/null; echo half")

    async def main() -> list[Any]:
        return await outcomes(config, [LARGE] * 30)

    assert on_loop(use_uvloop, main) == ["half"] * 30


@LOOPS
def test_exec_failing_without_reading_stdin_fails_by_its_status(use_uvloop: bool) -> None:
    config = sh("exit 3")

    async def main() -> list[Any]:
        return await outcomes(config, [SMALL] * 50 + [LARGE] * 10)

    assert on_loop(use_uvloop, main) == ["failed: exit status 3"] * 60


@LOOPS
@pytest.mark.parametrize("payload", [SMALL, LARGE], ids=["small", "large"])
def test_exec_timeout_of_a_program_that_never_reads(
    use_uvloop: bool, payload: Any, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    config = sh(f"echo $$ >> {pids}; exec sleep 60", timeout=0.5)

    async def main() -> list[Any]:
        return await outcomes(config, [payload] * 3)

    assert on_loop(use_uvloop, main) == ["failed: timed out after 0.5 s"] * 3
    assert all(is_gone(int(pid)) for pid in pids.read_text().split())  # killed and reaped


@LOOPS
@pytest.mark.parametrize("payload", [SMALL, LARGE], ids=["small", "large"])
def test_exec_cancel_of_a_program_that_never_reads(
    use_uvloop: bool, payload: Any, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    config = sh(f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; exec sleep 60")

    async def main() -> list[Any]:
        found: list[Any] = []

        async def run() -> None:
            found.extend(await outcomes(config, [payload]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_for(pid_file.exists, "the program to write its pid")
            tg.cancel_scope.cancel()
        return found

    assert on_loop(use_uvloop, main) == []  # cancelled: neither a result nor a failure
    assert is_gone(int(pid_file.read_text()))  # killed and reaped before cancellation went on


@LOOPS
def test_exec_cancelled_while_its_program_starts_leaves_nothing_running(
    use_uvloop: bool,
) -> None:
    """A job cancelled (timed out, or its daemon stopping) while its program is being
    started: the program is killed and reaped as at any other moment, not left to the
    event loop's child watcher, which may report to a loop already closed (an unreaped
    process, and a ResourceWarning when its object is collected)."""
    config = sh("sleep 60 & exec sleep 60")
    before = children()

    async def main() -> None:
        async with Handlers({config.name: config}) as handlers:
            for _ in range(20):
                with anyio.CancelScope() as scope:
                    scope.cancel()  # pending before the start: delivered at its first wait
                    await handlers.run(make_job(config.name))
                assert scope.cancelled_caught

    on_loop(use_uvloop, main)
    gc.collect()  # an unreaped one warns when collected, which fails the test
    assert children() == before


@LOOPS
def test_exec_cancelled_waits_for_its_output_pipes_to_close(
    use_uvloop: bool, tmp_path: Path
) -> None:
    """A cancelled program whose output a process outside its group still holds (here
    for 0.3 s): the job ends once the pipes close, nothing of it left open, even if the
    loop closes right after (as a daemon's does at its end)."""
    pid_file = tmp_path / "pid"
    config = sh(f"setsid sleep 0.3 & echo $$ > {pid_file}; exec sleep 60")

    async def main() -> None:
        async with Handlers({config.name: config}) as handlers, anyio.create_task_group() as tg:
            tg.start_soon(handlers.run, make_job(config.name))
            await wait_for(pid_file.exists, "the program to write its pid")
            tg.cancel_scope.cancel()

    on_loop(use_uvloop, main)
    gc.collect()  # a pipe left open warns when collected, which fails the test


# ---------------------------------------------------------------- http


class Server:
    """A real local HTTP server for the http handler to call."""

    def __init__(self, base: str, release: anyio.Event) -> None:
        self.base = base
        self.release = release

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    release = anyio.Event()

    async def json_echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "payload": orjson.loads(await request.read()),
                "content_type": request.headers.get("Content-Type"),
                "job_id": request.headers.get("X-Taskd-Job-Id"),
                "job_type": request.headers.get("X-Taskd-Job-Type"),
                "attempt": request.headers.get("X-Taskd-Attempt"),
            }
        )

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="plain text\n")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="x" * 2000 + " database is down")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="the reason")

    async def slow(request: web.Request) -> web.Response:
        await release.wait()  # until the fixture ends, far beyond any test's timeout
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_post("/json", json_echo)
    app.router.add_post("/text", text)
    app.router.add_post("/empty", empty)
    app.router.add_post("/error", error)
    app.router.add_post("/status/{code}", status)
    app.router.add_post("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Server(f"http://127.0.0.1:{port}", release)
    finally:
        release.set()
        await runner.cleanup()


def http_config(url: str, timeout: float = 30.0) -> HandlerConfig:
    return HandlerConfig(name="h", kind="http", http=url, timeout=timeout)


async def test_http_json_response(server: Server) -> None:
    config = http_config(server.url("/json"))
    async with Handlers({"h": config}, egress=LOOPBACK) as handlers:
        result = await run_job(handlers, make_job("h", {"n": [1, 2]}, job_id="j-7", attempts=2))
    assert result == {
        "payload": {"n": [1, 2]},
        "content_type": "application/json",
        "job_id": "j-7",
        "job_type": "h",
        "attempt": "2",
    }


async def test_http_text_response(server: Server) -> None:
    assert await run_one(http_config(server.url("/text"))) == "plain text"


async def test_http_empty_response_is_none(server: Server) -> None:
    assert await run_one(http_config(server.url("/empty"))) is None


async def test_http_error_status(server: Server) -> None:
    url = server.url("/error")
    error = await fails_with(http_config(url))
    prefix = f"HTTP 500 from {url}: "
    assert error.startswith(prefix)
    assert error.endswith("x database is down")
    assert len(error) <= len(prefix) + 500


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        (400, True),
        (404, True),
        (422, True),
        (408, False),
        (429, False),
        (500, False),
        (503, False),
    ],
)
async def test_http_status_permanent_or_retryable(
    server: Server, status: int, permanent: bool
) -> None:
    url = server.url(f"/status/{status}")
    failed = await failure(http_config(url))
    assert str(failed) == f"HTTP {status} from {url}: the reason"
    assert failed.permanent is permanent


async def test_http_connection_refused() -> None:
    # A bound socket that never listens: connecting to it is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        failed = await failure(http_config(url))
    assert str(failed).startswith(f"request to {url} failed: ClientConnectorError(")
    assert not failed.permanent


async def test_http_timeout(server: Server) -> None:
    failed = await failure(http_config(server.url("/slow"), timeout=0.5))
    assert (str(failed), failed.permanent) == ("timed out after 0.5 s", False)


async def test_http_needs_async_with(server: Server) -> None:
    handlers = Handlers({"h": http_config(server.url("/text"))})
    with pytest.raises(JobFailed, match="RuntimeError: Handlers must be entered"):
        await run_job(handlers, make_job("h"))


@LOOPS
@pytest.mark.parametrize("payload", [SMALL, LARGE], ids=["small", "large"])
def test_http_server_closing_before_it_reads_the_request(use_uvloop: bool, payload: Any) -> None:
    """A server that hangs up at once, mid-body or not: a retryable failure each time,
    never an error of the event loop's."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> list[Any]:
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await outcomes(http_config(f"http://127.0.0.1:{port}/"), [payload] * 20)

    found = on_loop(use_uvloop, main)
    assert all(
        isinstance(f, str) and f.startswith("failed: request to http://127.0.0.1:") for f in found
    ), found


# ---------------------------------------------------------------- http: where it may go


@dataclass
class Site:
    """A real HTTP server on a loopback address: answers a redirect for the paths in
    `redirects`, else the request back as JSON; records every request it gets."""

    base: str = ""
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path, body))
        if request.path in self.redirects:
            status, location = self.redirects[request.path]
            return web.Response(status=status, headers={"Location": location})
        return web.json_response({"method": request.method, "body": body.decode()})


@asynccontextmanager
async def site(host: str = "127.0.0.1") -> AsyncIterator[Site]:
    found = Site()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", found.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0).start()
        found.base = f"http://{host}:{runner.addresses[0][1]}"
        yield found
    finally:
        await runner.cleanup()


@pytest.fixture
async def one() -> AsyncIterator[Site]:
    async with site() as found:
        yield found


@pytest.fixture
async def other() -> AsyncIterator[Site]:
    async with site() as found:
        yield found


def redirecting(url: str, max_redirects: int) -> HandlerConfig:
    return HandlerConfig(name="h", kind="http", http=url, max_redirects=max_redirects)


PAYLOAD = {"n": 1}
SENT = orjson.dumps(PAYLOAD)


async def test_http_follows_redirects_up_to_max_redirects(one: Site) -> None:
    one.redirects["/start"] = (307, "/next")
    one.redirects["/next"] = (308, one.url("/end"))
    result = await run_one(redirecting(one.url("/start"), 2), PAYLOAD)
    # 307 and 308 within one site keep the method and the body.
    assert result == {"method": "POST", "body": SENT.decode()}
    assert [path for _, path, _ in one.seen] == ["/start", "/next", "/end"]


@pytest.mark.parametrize("max_redirects", [0, 1])
async def test_http_refuses_a_redirect_past_max_redirects(one: Site, max_redirects: int) -> None:
    one.redirects["/start"] = (302, "/next")
    one.redirects["/next"] = (302, "/end")
    failed = await failure(redirecting(one.url("/start"), max_redirects), PAYLOAD)
    last = ["/start", "/next"][max_redirects]
    assert str(failed).startswith(f"HTTP 302 from {one.url(last)}: redirect to /")
    assert str(failed).endswith(f"not followed: [handlers.h] max_redirects = {max_redirects}")
    assert not failed.permanent
    assert [path for _, path, _ in one.seen] == ["/start", "/next"][: max_redirects + 1]


@pytest.mark.parametrize("status", [301, 302, 303])
async def test_http_a_see_other_redirect_gets_without_the_payload(
    one: Site, other: Site, status: int
) -> None:
    one.redirects["/start"] = (status, other.url("/there"))
    result = await run_one(redirecting(one.url("/start"), 1), PAYLOAD)
    assert result == {"method": "GET", "body": ""}
    assert other.seen == [("GET", "/there", b"")]


@pytest.mark.parametrize("status", [307, 308])
async def test_http_a_307_or_308_to_another_site_is_not_followed(
    one: Site, other: Site, status: int
) -> None:
    one.redirects["/start"] = (status, other.url("/there"))
    failed = await failure(redirecting(one.url("/start"), 3), PAYLOAD)
    assert str(failed) == (
        f"HTTP {status} from {one.url('/start')}: redirect to {other.url('/there')} not "
        "followed: it would send the payload to another site"
    )
    assert not failed.permanent
    assert other.seen == []


@pytest.mark.parametrize(("allow", "reached"), [("127.0.0.0/8", True), ("127.0.0.1/32", False)])
async def test_http_each_redirect_is_checked_by_the_policy(
    one: Site, allow: str, reached: bool
) -> None:
    async with site("127.0.0.2") as beyond:
        one.redirects["/start"] = (302, beyond.url("/there"))
        policy = Policy(allow=(ipaddress.ip_network(allow),))
        config = redirecting(one.url("/start"), 3)
        if reached:
            assert await run_one(config, PAYLOAD, policy) == {"method": "GET", "body": ""}
        else:
            failed = await failure(config, PAYLOAD, policy)
            assert str(failed) == (
                f"request to {beyond.url('/there')} refused: destination 127.0.0.2 refused "
                "by [callbacks] allow/deny"
            )
            assert not failed.permanent  # the configured URL itself is permitted
        assert len(beyond.seen) == reached


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]"])
async def test_http_a_refused_configured_url_fails_for_good(one: Site, host: str) -> None:
    url = one.url("/json").replace("127.0.0.1", host)
    # Allowed, the URL reaches the server: the refusal below is the policy's doing.
    assert await run_one(http_config(url), PAYLOAD, LOOPBACK) == {
        "method": "POST",
        "body": '{"n":1}',
    }
    failed = await failure(http_config(url), PAYLOAD, DEFAULT_POLICY)
    # yarl writes the mapped address as ::ffff:7f00:1, the message adds what it maps.
    shown = "::ffff:7f00:1 (IPv4 127.0.0.1)" if "ffff" in host else host
    assert str(failed) == (
        f"request to {URL(url)} refused: destination {shown} refused by [callbacks] allow/deny"
    )
    assert failed.permanent
    assert len(one.seen) == 1


async def test_http_localhost_is_both_loopbacks(one: Site) -> None:
    url = one.url("/json").replace("127.0.0.1", "localhost")
    both = Policy(allow=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1")))
    assert await run_one(http_config(url), PAYLOAD, both) == {"method": "POST", "body": '{"n":1}'}
    # It may resolve to ::1 as well: with IPv4 loopback alone allowed, it is refused.
    failed = await failure(http_config(url), PAYLOAD, LOOPBACK)
    assert str(failed) == (
        f"request to {url} refused: destination localhost (loopback) refused by "
        "[callbacks] allow/deny"
    )
    assert failed.permanent
    assert len(one.seen) == 1
