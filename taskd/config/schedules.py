"""The [[schedules]] array: recurring jobs, each checked against the handlers it names."""

from __future__ import annotations

from collections.abc import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from taskd.config.handlers import HANDLER_RULE, valid_handler_name
from taskd.config.model import QUEUE_NAME, QUEUE_RULE, HandlerConfig, ScheduleConfig
from taskd.config.tables import Table, describe
from taskd.jobs import PRIORITIES

_CATCH_UP = ("none", "latest")


def read_schedules(
    root: Table, handlers: Mapping[str, HandlerConfig]
) -> tuple[ScheduleConfig, ...]:
    raw = root.data.get("schedules", [])
    if not isinstance(raw, list):
        root.problem(
            "schedules", f"must be an array of tables ([[schedules]]), got {describe(raw)}"
        )
        return ()
    schedules: list[ScheduleConfig] = []
    for index, spec in enumerate(raw):
        path = f"schedules[{index}]"
        if not isinstance(spec, Mapping):
            root.problems.append(f"{path}: must be a table, got {describe(spec)}")
            continue
        schedule = _schedule(Table(spec, path, root.problems, schema=ScheduleConfig), handlers)
        if any(s.name == schedule.name for s in schedules):
            root.problems.append(f"{path}.name: another schedule is named {schedule.name!r}")
        schedules.append(schedule)
    return tuple(schedules)


def _schedule(t: Table, handlers: Mapping[str, HandlerConfig]) -> ScheduleConfig:
    name = t.string("name", default="")
    if not valid_handler_name(name):
        t.problem("name", f"required, {HANDLER_RULE}")
    cron = t.string("cron", default="")
    if not croniter.is_valid(cron):
        t.problem("cron", f"not a cron expression (five fields or @hourly and the like): {cron!r}")
    zone = t.string("timezone")
    try:
        ZoneInfo(zone)
    except (ValueError, ZoneInfoNotFoundError):
        t.problem("timezone", f"unknown time zone {zone!r} (use an IANA name like Europe/Paris)")
    job_type = t.string("type")
    if job_type not in handlers:
        t.problem("type", f"must name a configured handler, got {job_type!r}")
    queue = t.data.get("queue")
    if queue is not None and (not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue)):
        t.problem("queue", f"must be a queue name: {QUEUE_RULE}")
    catch_up = t.string("catch_up")
    if catch_up not in _CATCH_UP:
        t.problem("catch_up", f"must be one of {', '.join(_CATCH_UP)}, got {catch_up!r}")
    return ScheduleConfig(
        name=name,
        cron=cron,
        timezone=zone,
        type=job_type,
        payload=t.data.get("payload"),
        queue=queue,
        catch_up=catch_up,
        priority=t.optional_integer("priority", PRIORITIES[0], PRIORITIES[-1]),
    )
