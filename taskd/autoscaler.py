"""The autoscaler (`taskd autoscale`): starts and stops daemon instances on the fleet's
sizing hint, between min_daemons and max_daemons, with hysteresis and cool-downs.

It reads the hint from one daemon's /stats (taskd.sizing makes it), decides with the pure
`decide`, and runs the configured start and stop commands with the instance number:
`systemctl start taskd@3` by default, which waits for the daemon to be ready, and
`systemctl stop taskd@3`, which waits for it to drain (SIGTERM). The instances it runs are
kept in a state file, so that a restarted controller takes them over.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from taskd.client import AddressError
from taskd.client.address import url_of_listen
from taskd.client.aio import AsyncClient
from taskd.config import AutoscaleConfig, Config
from taskd.config.autoscale import INSTANCE
from taskd.loop import Outage, repeat

logger = logging.getLogger(__name__)

# ceil() of a float that should be a whole number (2.0000000001) must not add one.
_EPSILON = 1e-9
# A bad config, as for the daemon: restarting cannot fix it.
EXIT_CONFIG = 2
# How much of a failed command's output goes into its error: its last lines say why.
OUTPUT_TAIL = 2000


class CommandFailed(Exception):
    """A start or stop command exited with an error, or outlasted command_timeout_s."""


class StateError(Exception):
    """The state file cannot be read as the instances a controller runs."""


@dataclass(frozen=True, slots=True)
class Hint:
    """The fleet's sizing hint, as /stats gives it under `autoscale`."""

    desired: int  # desired_daemons: what the work needs, rounded up, within min and max
    needed: float | None  # daemons_needed: unrounded; None while it cannot be told

    @classmethod
    def of(cls, stats: Mapping[str, Any]) -> Hint:
        """The hint of a /stats document; ValueError if it has none (an older daemon)."""
        hint = stats.get("autoscale")
        if not isinstance(hint, Mapping):
            raise ValueError("the /stats document has no autoscale hint: a taskd too old?")
        desired, needed = hint.get("desired_daemons"), hint.get("daemons_needed")
        if isinstance(desired, bool) or not isinstance(desired, int):
            raise ValueError(f"autoscale.desired_daemons is not an integer: {desired!r}")
        if needed is not None and (isinstance(needed, bool) or not isinstance(needed, int | float)):
            raise ValueError(f"autoscale.daemons_needed is not a number: {needed!r}")
        return cls(desired, None if needed is None else float(needed))


@dataclass(frozen=True, slots=True)
class Memory:
    """What `decide` carries from one pass to the next (times on the controller's clock)."""

    since: float  # when the controller began watching: removing waits cooldown_down_s
    changed_at: float | None = None  # the last change it made
    # (when, the count removing instances would go to), over the last cooldown_down_s.
    lows: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    target: int  # the instances to run
    reason: str
    memory: Memory = field(repr=False)


def decide(
    policy: AutoscaleConfig, *, running: int, hint: Hint, now: float, memory: Memory
) -> Decision:
    """How many instances to run, given the hint and what was decided before.

    - Never outside min_daemons to max_daemons: brought within them at once.
    - Up to the hint's desired_daemons at once, unless the last change was less than
      cooldown_up_s ago.
    - Down only to a count each daemon of which would be at most 1 - hysteresis busy
      (daemons_needed / (1 - hysteresis), rounded up), the highest such count of the last
      cooldown_down_s, once that long has passed since the last change (or the start).
      The band between keeps the count from flapping around a fractional need.
    """

    def bounded(count: int) -> int:
        return min(policy.max_daemons, max(policy.min_daemons, count))

    def change(target: int, reason: str) -> Decision:
        return Decision(target, reason, Memory(since=memory.since, changed_at=now))

    if running != bounded(running):
        # Not a change of the fleet's size for the cool-downs: the hint is not involved.
        return Decision(bounded(running), "outside min_daemons to max_daemons", memory)
    up = bounded(hint.desired)
    if hint.needed is None:
        low = up
    else:
        low = bounded(math.ceil(hint.needed / (1 - policy.hysteresis) - _EPSILON))
    recent = tuple((at, count) for at, count in memory.lows if at > now - policy.cooldown_down_s)
    kept = Memory(since=memory.since, changed_at=memory.changed_at, lows=(*recent, (now, low)))
    last = memory.since if memory.changed_at is None else max(memory.since, memory.changed_at)
    if up > running:
        if memory.changed_at is None or now - memory.changed_at >= policy.cooldown_up_s:
            return change(up, f"the hint asks for {hint.desired}")
        return Decision(running, "cooling down after the last change", kept)
    floor = max(count for _, count in kept.lows)
    if floor < running:
        if now - last >= policy.cooldown_down_s:
            return change(floor, f"the hint has asked for {floor} or fewer for a while")
        return Decision(running, "waiting for the hint to stay low", kept)
    return Decision(running, "as the hint asks", kept)


class StateFile:
    """The instance numbers the controller runs, in a JSON file: {"instances": [1, 2]}.

    Written whole to a temporary file and renamed over the old one, so that a crash leaves
    the old list or the new one, never half of one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> set[int]:
        """The recorded instances: none when there is no file yet; StateError if unreadable."""
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return set()
        except (OSError, orjson.JSONDecodeError) as exc:
            raise StateError(f"{self.path}: cannot read the autoscaler's state: {exc}") from exc
        instances = data.get("instances") if isinstance(data, dict) else None
        if not isinstance(instances, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in instances
        ):
            raise StateError(f"{self.path}: not a list of instance numbers: {data!r}")
        return set(instances)

    def save(self, instances: set[int]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_bytes(orjson.dumps({"instances": sorted(instances)}))
        os.replace(temporary, self.path)


async def run_command(argv: Sequence[str], most_s: float) -> None:
    """Run a start or stop command to its end; CommandFailed if it fails or outlasts
    `most_s` seconds (then it is killed, as it is when the controller is cancelled)."""
    # Shielded: a cancellation while it starts would cut short the loop's clean-up of it
    # (see handlers._run_exec); it takes effect below, which kills and reaps it.
    with anyio.CancelScope(shield=True):
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        with anyio.fail_after(most_s):
            output, _ = await process.communicate()
    except TimeoutError:
        raise CommandFailed(f"`{' '.join(argv)}` took more than {most_s:g} s") from None
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
    said = output.decode(errors="replace").strip()[-OUTPUT_TAIL:]
    if process.returncode != 0:
        raise CommandFailed(f"`{' '.join(argv)}` exited {process.returncode}: {said}")
    if said:
        logger.info("`%s`: %s", " ".join(argv), said)


def with_instance(template: Sequence[str], number: int) -> list[str]:
    """A command template with {n} replaced by the instance number (other braces stay)."""
    return [arg.replace(INSTANCE, str(number)) for arg in template]


class Autoscaler:
    """Every poll_interval_s, reads the hint and starts or stops instances to follow it.

    `read_stats` gets a /stats document; `run` runs a command (argv, most seconds); `clock`
    gives monotonic seconds.
    """

    def __init__(
        self,
        *,
        policy: AutoscaleConfig,
        read_stats: Callable[[], Awaitable[Mapping[str, Any]]],
        state: StateFile,
        run: Callable[[Sequence[str], float], Awaitable[None]] = run_command,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._read_stats = read_stats
        self._state = state
        self._run = run
        self._clock = clock
        self.instances = state.load()
        self._memory = Memory(since=clock())
        # The recorded instances are started again first (a no-op for a running unit):
        # after a reboot, say, nothing runs them until then.
        self._resumed = False

    async def tick(self) -> Decision:
        """One pass: resume the recorded instances if not done yet, bring their count
        within min_daemons and max_daemons, or else read the hint and start or stop
        instances as `decide` says."""
        if not self._resumed:
            await self._resume()
        running = len(self.instances)
        bounded = min(self._policy.max_daemons, max(self._policy.min_daemons, running))
        if bounded != running:
            # Before reading the hint: the daemon it is read from may be one to start.
            why = "below min_daemons" if running < bounded else "above max_daemons"
            logger.info("scaling from %d to %d instances: %s", running, bounded, why)
            await self._scale_to(bounded)
            return Decision(bounded, why, self._memory)
        hint = Hint.of(await self._read_stats())
        decision = decide(
            self._policy, running=running, hint=hint, now=self._clock(), memory=self._memory
        )
        self._memory = decision.memory
        if decision.target != running:
            logger.info(
                "scaling from %d to %d instances: %s (desired %d, needed %s)",
                running, decision.target, decision.reason, hint.desired, hint.needed,
            )  # fmt: skip
            await self._scale_to(decision.target)
        return decision

    async def run(self) -> None:
        """Follow the hint until cancelled."""
        outage = Outage("autoscaling", logger)
        await repeat(self._tick_then_wait, outage=outage, retry_delay=self._policy.poll_interval_s)

    async def _tick_then_wait(self) -> None:
        await self.tick()
        await anyio.sleep(self._policy.poll_interval_s)

    async def _resume(self) -> None:
        for number in sorted(self.instances):
            await self._command(self._policy.start_command, number)
        if self.instances:
            logger.info("resumed instances %s", ", ".join(map(str, sorted(self.instances))))
        self._resumed = True

    async def _scale_to(self, target: int) -> None:
        """Start the lowest free numbers, or stop the highest, until `target` run."""
        while len(self.instances) < target:
            number = min(set(range(1, target + 1)) - self.instances)
            await self._start(number)
        while len(self.instances) > target:
            number = max(self.instances)
            await self._command(self._policy.stop_command, number)
            self.instances.discard(number)
            self._state.save(self.instances)
            logger.info("stopped instance %d", number)

    async def _start(self, number: int) -> None:
        # Recorded first: were the controller to die during the command, the instance
        # would still be its own to stop, not one running unknown.
        self.instances.add(number)
        self._state.save(self.instances)
        try:
            await self._command(self._policy.start_command, number)
        except CommandFailed:
            # Stopped, lest a half-started one run on unrecorded; kept if that fails too.
            try:
                await self._command(self._policy.stop_command, number)
            except CommandFailed as exc:
                logger.warning("instance %d failed to start, and to stop: %s", number, exc)
            else:
                self.instances.discard(number)
                self._state.save(self.instances)
            raise
        logger.info("started instance %d", number)

    async def _command(self, template: Sequence[str], number: int) -> None:
        await self._run(with_instance(template, number), self._policy.command_timeout_s)


def main(config: Config) -> int:
    """`taskd autoscale`: follow the hint until SIGTERM or SIGINT; the instances keep
    running after. Exit 2 when it cannot tell which daemon to read, 1 for a bad state file."""
    policy = config.autoscale
    try:
        url = policy.url or url_of_listen(config.server.listen, config.source)
    except AddressError as exc:
        logger.error(
            "cannot tell which daemon to read the hint from: %s (set [autoscale] url)", exc
        )
        return EXIT_CONFIG
    client = AsyncClient(url, token=config.server.token)
    state = StateFile(policy.state_file)
    try:
        scaler = Autoscaler(policy=policy, read_stats=client.stats, state=state)
    except StateError as exc:
        logger.error("%s", exc)
        return 1
    logger.info(
        "autoscaling %d to %d instances on the hint of %s, state in %s",
        policy.min_daemons, policy.max_daemons, url, state.path,
    )  # fmt: skip
    anyio.run(_serve, scaler, client, backend="asyncio")
    return 0


async def _serve(scaler: Autoscaler, client: AsyncClient) -> None:
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                tg.start_soon(scaler.run)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    logger.info("%s: stopping; the instances keep running", name)
                    tg.cancel_scope.cancel()
                    break
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()
