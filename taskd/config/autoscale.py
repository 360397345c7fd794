"""The [autoscale] table, checked: the sizing hint's target and bounds, and the controller's."""

from __future__ import annotations

import math
from pathlib import Path

from taskd.client.address import endpoint
from taskd.client.errors import AddressError
from taskd.config.model import AutoscaleConfig
from taskd.config.tables import Table, describe

# Instances are numbered 1 to max_daemons; more than this on one controller is surely a typo.
MAX_INSTANCES = 1000
_DAY = 86_400.0
_HOUR = 3600.0
# Past this the band is so wide that the fleet would hardly ever shrink.
_MOST_HYSTERESIS = 0.9
INSTANCE = "{n}"


def read_autoscale(t: Table) -> AutoscaleConfig:
    target_drain_s = t.seconds("target_drain_s", _DAY)
    min_daemons = t.integer("min_daemons", 1, MAX_INSTANCES)
    max_daemons = t.integer("max_daemons", 1, MAX_INSTANCES)
    if not t.bad & {"min_daemons", "max_daemons"} and min_daemons > max_daemons:
        t.problem(
            "min_daemons",
            f"must be at most {t.key('max_daemons')} ({max_daemons}), got {min_daemons}",
        )
    url = t.string("url", default="") or None
    if url is not None:
        try:
            endpoint(url)
        except AddressError as exc:
            t.problem("url", str(exc))
    state_file = t.string("state_file", default=str(t.default("state_file")))
    if "state_file" not in t.bad and not state_file:
        t.problem("state_file", "must not be empty")
    return AutoscaleConfig(
        target_drain_s=target_drain_s,
        min_daemons=min_daemons,
        max_daemons=max_daemons,
        hysteresis=_fraction(t, "hysteresis", _MOST_HYSTERESIS),
        cooldown_up_s=t.seconds("cooldown_up_s", _DAY),
        cooldown_down_s=t.seconds("cooldown_down_s", _DAY),
        poll_interval_s=t.seconds("poll_interval_s", _HOUR),
        url=url,
        start_command=_command(t, "start_command"),
        stop_command=_command(t, "stop_command"),
        command_timeout_s=t.seconds("command_timeout_s", _HOUR),
        state_file=Path(state_file),
    )


def _fraction(t: Table, name: str, most: float) -> float:
    default: float = t.default(name)
    value = t.data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        t.problem(name, f"must be a number from 0 to {most:g}, got {describe(value)}")
        return default
    if not (math.isfinite(value) and 0 <= value <= most):
        t.problem(name, f"must be a number from 0 to {most:g}, got {value}")
        return default
    return float(value)


def _command(t: Table, name: str) -> tuple[str, ...]:
    """A program and its arguments, run without a shell, one of which holds {n}."""
    argv = t.strings(name, "a program and its arguments")
    if name not in t.bad and not any(INSTANCE in arg for arg in argv):
        t.problem(name, f"must contain {INSTANCE}, the instance number, in one of its arguments")
    return argv
