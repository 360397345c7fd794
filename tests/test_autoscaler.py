"""The autoscaler: its decisions over hints on a test clock, the controller's passes and its
state file, the commands it runs, and `taskd autoscale` driving real daemon processes."""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from taskd.autoscaler import (
    Autoscaler,
    CommandFailed,
    Hint,
    Memory,
    StateError,
    StateFile,
    decide,
    run_command,
    with_instance,
)
from taskd.config import AutoscaleConfig
from tests.builders import write_daemon_config
from tests.support import (
    BUILTINS,
    REPO,
    TASKD,
    DaemonProcess,
    children,
    get_json,
    is_gone,
    post_json,
    wait_until,
)
from tests.test_systemd import (
    documented_program,
    exec_start,
    needs_systemd_analyze,
    rooted_install,
    verify_problems,
)

POLICY = AutoscaleConfig(
    min_daemons=1,
    max_daemons=5,
    hysteresis=0.2,
    cooldown_up_s=30.0,
    cooldown_down_s=300.0,
)
INSTANCE = REPO / "tests" / "programs" / "instance.py"


def hint(desired: int, needed: float | None = None) -> Hint:
    return Hint(desired, float(desired) if needed is None else needed)


class Controller:
    """decide() driven pass by pass, its memory carried, on a clock the test moves."""

    def __init__(self, policy: AutoscaleConfig = POLICY, running: int = 1) -> None:
        self.policy = policy
        self.running = running
        self.now = 1000.0
        self.memory = Memory(since=self.now)

    def tick(self, hint: Hint, after: float = 0.0) -> int:
        self.now += after
        decision = decide(
            self.policy, running=self.running, hint=hint, now=self.now, memory=self.memory
        )
        self.memory = decision.memory
        self.running = decision.target
        return self.running


# The decisions, over hints


def test_a_higher_hint_scales_up_at_once_to_what_it_asks() -> None:
    controller = Controller()
    assert controller.tick(hint(4)) == 4


def test_after_a_change_more_waits_for_the_up_cooldown() -> None:
    controller = Controller()
    assert controller.tick(hint(2)) == 2
    assert controller.tick(hint(4), after=29.0) == 2
    assert controller.tick(hint(4), after=1.0) == 4


def test_fewer_waits_until_the_hint_stayed_lower_for_the_down_cooldown() -> None:
    controller = Controller(running=4)
    for _ in range(29):
        assert controller.tick(hint(1, 0.5), after=10.0) == 4
    # 300 s: down, to the highest count the window asked for (a spike within it counts).
    assert controller.tick(hint(3, 2.4), after=10.0) == 3
    # Then the window starts again from that change.
    assert controller.tick(hint(1, 0.5), after=299.0) == 3
    assert controller.tick(hint(1, 0.5), after=1.0) == 1


def test_the_hysteresis_band_holds_the_count_around_a_fractional_need() -> None:
    controller = Controller(running=3)
    # 3 daemons: up only past 3 needed, down to 2 only at 2 x 0.8 = 1.6 or less.
    for needed in (2.9, 2.1, 1.7, 2.5, 1.61):
        assert controller.tick(hint(math_ceil(needed), needed), after=400.0) == 3
    assert controller.tick(hint(2, 1.6), after=400.0) == 2
    assert controller.tick(hint(3, 2.01), after=400.0) == 3


def math_ceil(value: float) -> int:
    return -int(-value // 1)


def test_without_hysteresis_the_count_follows_the_need_down() -> None:
    controller = Controller(policy=replace(POLICY, hysteresis=0.0), running=3)
    assert controller.tick(hint(2, 1.9), after=400.0) == 2


def test_an_unknown_need_scales_down_only_to_the_desired_count() -> None:
    controller = Controller(running=3)
    assert controller.tick(Hint(2, None), after=400.0) == 2


def test_never_beyond_min_or_max_whatever_the_hint() -> None:
    controller = Controller(running=0)
    assert controller.tick(hint(0, 0.0)) == 1  # below min: brought up at once
    assert controller.tick(hint(50), after=1.0) == 5
    for _ in range(5):
        assert controller.tick(hint(0, 0.0), after=400.0) >= 1
    assert controller.running == 1
    lowered = Controller(policy=replace(POLICY, max_daemons=2), running=4)
    assert lowered.tick(hint(4)) == 2  # above max (the config changed): at once


def test_a_bounds_correction_is_no_change_for_the_cooldowns() -> None:
    controller = Controller(running=0)
    assert controller.tick(hint(3)) == 1
    assert controller.tick(hint(3)) == 3


def test_the_hint_is_read_from_a_stats_document() -> None:
    stats = {"autoscale": {"desired_daemons": 3, "daemons_needed": 2.5, "backlog": 7}}
    assert Hint.of(stats) == Hint(3, 2.5)
    assert Hint.of({"autoscale": {"desired_daemons": 1, "daemons_needed": None}}) == Hint(1, None)
    for bad in ({}, {"autoscale": {"desired_daemons": "3"}}, {"autoscale": 1}):
        with pytest.raises(ValueError, match="autoscale"):
            Hint.of(bad)


# The controller's passes, with commands recorded and hints given by the test


class Fleet:
    """What the controller acts on: the hint it reads, the commands it runs (recorded; a
    command given in `failing` fails), and a clock."""

    def __init__(self) -> None:
        self.hint: dict[str, Any] = {"desired_daemons": 1, "daemons_needed": 0.5}
        self.commands: list[list[str]] = []
        self.failing: set[str] = set()
        self.now = 0.0

    async def stats(self) -> Mapping[str, Any]:
        return {"autoscale": self.hint}

    async def run(self, argv: Sequence[str], most_s: float) -> None:
        self.commands.append(list(argv))
        if " ".join(argv) in self.failing:
            raise CommandFailed(f"`{' '.join(argv)}` exited 1: no")

    def clock(self) -> float:
        return self.now

    def controller(self, state: Path, policy: AutoscaleConfig = POLICY) -> Autoscaler:
        policy = replace(policy, cooldown_up_s=1.0, cooldown_down_s=5.0)
        return Autoscaler(
            policy=policy,
            read_stats=self.stats,
            state=StateFile(state),
            run=self.run,
            clock=self.clock,
        )


def start(n: int) -> list[str]:
    return ["systemctl", "start", f"taskd@{n}"]


def stop(n: int) -> list[str]:
    return ["systemctl", "stop", f"taskd@{n}"]


async def test_instances_are_started_and_stopped_and_recorded(tmp_path: Path) -> None:
    fleet = Fleet()
    state = tmp_path / "autoscale.json"
    scaler = fleet.controller(state)
    await scaler.tick()
    assert fleet.commands == [start(1)]
    fleet.hint = {"desired_daemons": 3, "daemons_needed": 2.5}
    await scaler.tick()
    assert fleet.commands[1:] == [start(2), start(3)]
    assert StateFile(state).load() == {1, 2, 3}
    fleet.hint = {"desired_daemons": 1, "daemons_needed": 0.2}
    fleet.now += 1
    await scaler.tick()
    fleet.now += 5
    await scaler.tick()
    assert fleet.commands[3:] == [stop(3), stop(2)]  # the highest first
    assert StateFile(state).load() == {1}
    assert state.read_text() == '{"instances":[1]}'


async def test_a_restarted_controller_takes_its_instances_over(tmp_path: Path) -> None:
    fleet = Fleet()
    state = tmp_path / "autoscale.json"
    StateFile(state).save({1, 2})
    fleet.hint = {"desired_daemons": 2, "daemons_needed": 1.5}
    scaler = fleet.controller(state)
    assert scaler.instances == {1, 2}
    await scaler.tick()
    # Started again (for a unit already running, a no-op), none added.
    assert fleet.commands == [start(1), start(2)]
    await scaler.tick()
    assert fleet.commands == [start(1), start(2)]
    fleet.hint = {"desired_daemons": 3, "daemons_needed": 2.5}
    await scaler.tick()
    assert fleet.commands[2:] == [start(3)]


async def test_a_start_that_fails_is_stopped_and_forgotten_and_the_pass_fails(
    tmp_path: Path,
) -> None:
    fleet = Fleet()
    state = tmp_path / "autoscale.json"
    scaler = fleet.controller(state)
    await scaler.tick()
    fleet.hint = {"desired_daemons": 2, "daemons_needed": 1.5}
    fleet.failing = {" ".join(start(2))}
    with pytest.raises(CommandFailed):
        await scaler.tick()
    assert fleet.commands[1:] == [start(2), stop(2)]
    assert StateFile(state).load() == {1}
    fleet.failing = set()
    fleet.now += 1
    await scaler.tick()
    assert fleet.commands[3:] == [start(2)]


async def test_an_instance_that_fails_to_start_and_to_stop_stays_recorded(tmp_path: Path) -> None:
    fleet = Fleet()
    state = tmp_path / "autoscale.json"
    scaler = fleet.controller(state)
    fleet.failing = {" ".join(start(1)), " ".join(stop(1))}
    with pytest.raises(CommandFailed):
        await scaler.tick()
    assert StateFile(state).load() == {1}


def test_a_state_file_that_is_not_a_list_of_instances_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "autoscale.json"
    assert StateFile(state).load() == set()
    for text in ("{", '{"instances": [0]}', '{"instances": "1"}', "[1]", '{"instances":[true]}'):
        state.write_text(text)
        with pytest.raises(StateError, match=str(state)):
            StateFile(state).load()


def test_the_instance_number_goes_where_the_template_says() -> None:
    assert with_instance(["systemctl", "start", "taskd@{n}"], 7) == [
        "systemctl",
        "start",
        "taskd@7",
    ]
    assert with_instance(["run", "{n}", "{x}", "{{n}}"], 2) == ["run", "2", "{x}", "{2}"]


# The commands, as real processes


async def test_a_command_that_succeeds() -> None:
    await run_command([sys.executable, "-c", "print('started')"], 30.0)


async def test_a_command_that_fails_says_how_and_why() -> None:
    script = "import sys; print('no such unit'); sys.exit(5)"
    with pytest.raises(CommandFailed, match="exited 5: no such unit"):
        await run_command([sys.executable, "-c", script], 30.0)


async def test_a_command_that_hangs_is_killed_after_its_time(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    with pytest.raises(CommandFailed, match="took more than 1 s"):
        await run_command([sys.executable, "-c", script], 1.0)
    assert is_gone(int(pid_file.read_text()))


def test_a_command_cancelled_while_it_starts_is_killed_and_reaped() -> None:
    """The controller stopped while a command starts: the command does not outlive it,
    nor is it left to the event loop's child watcher (see handlers' test of the same)."""
    before = children()

    async def main() -> None:
        for _ in range(20):
            with anyio.CancelScope() as scope:
                scope.cancel()  # pending before the start: delivered at its first wait
                await run_command(["sleep", "60"], 30.0)
            assert scope.cancelled_caught

    anyio.run(main)
    gc.collect()  # an unreaped one warns when collected, which fails the test
    assert children() == before


# `taskd autoscale` on real daemon processes


def instance_command(action: str, directory: Path) -> list[str]:
    return [sys.executable, str(INSTANCE), action, "{n}", str(directory)]


def live_instances(directory: Path) -> set[int]:
    """The instances whose daemon process runs, as their pid files say."""
    return {int(pid_file.stem) for pid_file in directory.glob("*.pid") if _runs(pid_file)}


def _runs(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
    except FileNotFoundError:
        return False  # its stop removed it between the listing and the reading
    return not is_gone(pid)


@pytest.mark.timeout(180)
async def test_instances_follow_a_backlog_up_and_back_down_losing_nothing(
    tmp_path: Path, redis_url: str, free_port: Any
) -> None:
    autoscale = {
        "target_drain_s": 2,
        "min_daemons": 1,
        "max_daemons": 3,
        "cooldown_up_s": 1,
        "cooldown_down_s": 2,
        "poll_interval_s": 0.25,
        "start_command": instance_command("start", tmp_path),
        "stop_command": instance_command("stop", tmp_path),
        "command_timeout_s": 90,
        "state_file": str(tmp_path / "autoscale.json"),
    }
    workers = {"concurrency": 2, "heartbeat_interval": 0.5, "dead_after": 5}
    for n in (1, 2, 3):
        write_daemon_config(
            tmp_path / f"{n}.toml",
            free_port(),
            redis={"url": redis_url},
            workers={**workers, "shutdown_timeout": 10},
            handlers=BUILTINS,
            autoscale=autoscale,
        )
    url = f"http://{_listen(tmp_path / '1.toml')}"
    controller = DaemonProcess(["autoscale", "--config", str(tmp_path / "1.toml")], cwd=tmp_path)
    try:
        async with aiohttp.ClientSession() as session:

            async def live(count: int) -> bool:
                if controller.proc.poll() is not None:
                    raise AssertionError(f"the controller exited:\n{controller.output()}")
                _, stats = await _stats(session, url)
                wanted = set(range(1, count + 1))
                return (
                    live_instances(tmp_path) == wanted
                    and StateFile(tmp_path / "autoscale.json").load() == wanted
                    and stats is not None
                    and len(stats["instances"]) == count
                )

            await wait_until(lambda: live(1), "the controller to start instance 1", 60)
            jobs = [{"type": "sleep", "payload": {"seconds": 0.5}}] * 48
            status, body = await post_json(session, f"{url}/jobs/batch", {"jobs": jobs})
            assert status == 201, body
            # 2 slots a daemon, half a second a job: 48 jobs to drain in 2 s need all 3.
            await wait_until(lambda: live(3), "instances 2 and 3 to start", 90)

            async def drained() -> bool:
                _, stats = await _stats(session, url)
                return stats is not None and stats["queues"]["default"]["completed"] == 48

            await wait_until(drained, "the backlog to drain", 90)
            await wait_until(lambda: live(1), "instances 3 and 2 to stop", 90)

            _, stats = await get_json(session, f"{url}/stats")
        default = stats["queues"]["default"]
        assert (default["completed"], default["failed"], default["queued"]) == (48, 0, 0)
        assert default["totals"]["recovered"] == 0  # none taken back from a daemon that died
        assert stats["autoscale"]["desired_daemons"] == 1
        for n in (2, 3):
            assert "stopped" in (tmp_path / f"{n}.log").read_text()  # drained, not killed
        assert StateFile(tmp_path / "autoscale.json").load() == {1}
        output = controller.output()
        assert re.search(r"scaling from [12] to 3 instances", output), output
        assert "stopped instance 3" in output
        controller.signal()
        assert controller.wait() == 0, controller.output()
        assert live_instances(tmp_path) == {1}  # the instances outlive the controller
    finally:
        controller.kill()
        for n in (1, 2, 3):
            stop = [arg.replace("{n}", str(n)) for arg in instance_command("stop", tmp_path)]
            await anyio.run_process(stop, check=False)


async def _stats(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    try:
        return await get_json(session, f"{url}/stats")
    except aiohttp.ClientError:
        return 0, None


def _listen(config: Path) -> str:
    for line in config.read_text().splitlines():
        if line.startswith("listen = "):
            return str(line.split('"')[1])
    raise AssertionError(f"no listen in {config}")


async def test_taskd_autoscale_needs_to_know_which_daemon_to_read(tmp_path: Path) -> None:
    config = tmp_path / "taskd.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n[handlers.echo]\nbuiltin = "echo"\n')
    done = await anyio.run_process(
        [str(TASKD), "autoscale", "--config", str(config)], cwd=tmp_path, check=False
    )
    assert done.returncode == 2
    said = done.stderr.decode()
    assert "the daemon listens on a port chosen at start" in said
    assert "set [autoscale] url" in said


async def test_taskd_autoscale_refuses_a_state_file_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "autoscale.json").write_text("[1, 2]")
    config = tmp_path / "taskd.toml"
    config.write_text('[handlers.echo]\nbuiltin = "echo"\n')
    done = await anyio.run_process(
        [str(TASKD), "autoscale", "--config", str(config)], cwd=tmp_path, check=False
    )
    assert done.returncode == 1
    assert "autoscale.json: not a list of instance numbers" in done.stderr.decode()


# The controller's systemd unit


def test_the_controller_unit_runs_the_documented_taskd_on_instance_1s_config() -> None:
    program, *args = exec_start("taskd-autoscale.service")
    assert program == documented_program()
    assert args == ["autoscale", "--config", "/etc/taskd/1.toml"]
    assert AutoscaleConfig().start_command == ("systemctl", "start", "taskd@{n}")
    # The unit's working directory is its state directory, where the state file goes.
    unit = (REPO / "systemd" / "taskd-autoscale.service").read_text()
    assert "\nStateDirectory=taskd-autoscale\n" in unit
    assert "\nWorkingDirectory=/var/lib/taskd-autoscale\n" in unit
    assert not AutoscaleConfig().state_file.is_absolute()


@needs_systemd_analyze
def test_the_controller_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = rooted_install(tmp_path, "taskd-autoscale.service", "taskd-autoscale.service")
    problems, output = verify_problems(tmp_path, unit)
    assert problems == [], f"systemd-analyze verify taskd-autoscale.service:\n{output}"
