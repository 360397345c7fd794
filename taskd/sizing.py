"""The autoscaling hint: from a queue's backlog, rates and daemons, how many daemons of the
current size would drain it in time (docs/operations.md#autoscaling has the formula)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from taskd.config import AutoscaleConfig
from taskd.store import DaemonInfo, Rates

# ceil() of a sum of floats that should be a whole number (2.0000000001) must not add one.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Load:
    """What a queue (or the fleet) asks of the daemons, and how many it takes."""

    backlog: int  # ready jobs and scheduled ones already due: waiting to start
    active: int  # jobs running now
    arrival_per_s: float
    completion_per_s: float
    daemons: int  # live daemons serving it
    # What one daemon of the current size completes per second with every slot busy;
    # None while it cannot be told (no daemon to take the size of, no run time yet).
    per_daemon_per_s: float | None
    # Daemons' worth of work: busy slots now, or needed for the arrivals, and the slots
    # that would drain the backlog in time, over a daemon's slots. None: cannot be told.
    needed: float | None


def queue_load(
    *,
    queued: int,
    active: int,
    rates: Rates,
    serving: Sequence[DaemonInfo],
    live: Sequence[DaemonInfo],
    target_drain_s: float,
) -> Load:
    """One queue's load: `serving` are the live daemons that take its jobs, `live` all of them
    (whose size counts for a queue none serves: the daemons started next are like them)."""
    window_s = rates.window_ms / 1000
    arrival = rates.arrived / window_s
    backlog = queued + rates.due
    sized = serving or live
    slots = sum(d.concurrency for d in sized) / len(sized) if sized else None
    run_s = None if rates.mean_run_ms is None else max(rates.mean_run_ms, 1.0) / 1000
    # A paused queue starts nothing: only what runs already needs a slot.
    waiting = 0 if rates.paused else backlog
    arriving = 0.0 if rates.paused else arrival
    return Load(
        backlog=backlog,
        active=active,
        arrival_per_s=arrival,
        completion_per_s=rates.finished / window_s,
        daemons=len(serving),
        per_daemon_per_s=None if slots is None or run_s is None else slots / run_s,
        needed=_needed(active, waiting, arriving, slots, run_s, target_drain_s),
    )


def _needed(
    active: int,
    backlog: int,
    arrival: float,
    slots: float | None,
    run_s: float | None,
    target_drain_s: float,
) -> float | None:
    """Daemons' worth of work (Little's law: a slot completes a job per mean run time)."""
    if slots is None:
        return None if active or backlog or arrival else 0.0
    if run_s is None:
        # No job has finished yet: what runs needs its slots; more cannot be sized.
        return None if backlog or arrival else active / slots
    busy = max(float(active), arrival * run_s)
    return (busy + backlog * run_s / target_drain_s) / slots


def fleet_load(loads: Sequence[Load], live: Sequence[DaemonInfo]) -> Load:
    """Every queue together: daemons share their slots among their queues, so the fleet
    needs the sum of what each queue needs (each in daemons of its own size)."""
    needs = [load.needed for load in loads]
    return Load(
        backlog=sum(load.backlog for load in loads),
        active=sum(load.active for load in loads),
        arrival_per_s=sum(load.arrival_per_s for load in loads),
        completion_per_s=sum(load.completion_per_s for load in loads),
        daemons=len(live),
        per_daemon_per_s=None,
        needed=None if None in needs else sum(n for n in needs if n is not None),
    )


def desired_daemons(load: Load, policy: AutoscaleConfig) -> int:
    """The daemons to run: what the work needs rounded up, or while that cannot be told,
    the daemons there are (at least one); always from min_daemons to max_daemons."""
    needed = load.needed
    wanted = max(load.daemons, 1) if needed is None else math.ceil(needed - _EPSILON)
    return min(policy.max_daemons, max(policy.min_daemons, wanted))


def drain_s(load: Load) -> float | None:
    """Seconds until the backlog is gone at the current rates: 0 with none, None (never)
    while jobs arrive as fast as they complete or faster."""
    if load.backlog == 0:
        return 0.0
    net = load.completion_per_s - load.arrival_per_s
    return load.backlog / net if net > 0 else None


def public(load: Load, policy: AutoscaleConfig, *, fleet: bool = False) -> dict[str, Any]:
    """The `autoscale` object of /stats, for a queue or (`fleet`) for the whole fleet."""
    drain = drain_s(load)
    shown: dict[str, Any] = {
        "backlog": load.backlog,
        "arrival_per_s": round(load.arrival_per_s, 3),
        "completion_per_s": round(load.completion_per_s, 3),
        "drain_s": None if drain is None else round(drain, 1),
        "daemons": load.daemons,
        "daemons_needed": None if load.needed is None else round(load.needed, 3),
        "desired_daemons": desired_daemons(load, policy),
    }
    if fleet:
        shown["target_drain_s"] = policy.target_drain_s
        shown["min_daemons"] = policy.min_daemons
        shown["max_daemons"] = policy.max_daemons
    else:
        per_daemon = load.per_daemon_per_s
        shown["per_daemon_per_s"] = None if per_daemon is None else round(per_daemon, 3)
    return shown
