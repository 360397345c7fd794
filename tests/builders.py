"""Test builders: jobs, finished attempts, a clock the test moves, and config files."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from taskd.jobs import QUEUED, SCHEDULED, Job, new_id
from taskd.metrics import Metrics
from taskd.reaper import Reaper
from taskd.store import Attempt, Store
from tests.support import REPO

Q = "default"


def new_job(job_type: str = "echo", payload: Any = None, *, queue: str = Q, **fields: Any) -> Job:
    """A new job as a submission makes it: queued, or scheduled when given a run_at; created
    at 1 ms, 3 attempts allowed. Any other Job field can be given, e.g. priority=9."""
    values: dict[str, Any] = {
        "id": new_id(),
        "state": SCHEDULED if fields.get("run_at") else QUEUED,
        "attempts": 0,
        "created_at": 1,
        "max_attempts": 3,
        **fields,
    }
    return Job(type=job_type, queue=queue, payload=payload, **values)


async def enqueue(store: Store, count: int, **fields: Any) -> list[Job]:
    """`count` new jobs with payloads {"n": 0}, {"n": 1}..., enqueued one by one."""
    jobs = [new_job(payload={"n": n}, **fields) for n in range(count)]
    for each in jobs:
        assert await store.enqueue(each)
    return jobs


def reaper(store: Store, clock: Clock, me: str = "live", *, dead_after: float = 30.0) -> Reaper:
    """A reaper of queue "default" as daemon `me` runs it, on `clock`."""
    return Reaper(
        store=store,
        daemon_id=me,
        queues=[Q],
        interval=1,
        dead_after=dead_after,
        metrics=Metrics(concurrency=1),
        clock=clock,
    )


def ended(
    job: Job, outcome: str, value: str = "", retry_at: int = 0, finished_at: int = 0
) -> Attempt:
    """The end of `job`'s current attempt, as a worker acks it."""
    return Attempt(job.id, job.attempts, outcome, value, retry_at, finished_at)


def done(job: Job, outcome: str = "completed") -> Attempt:
    """`job`'s current attempt ended so (completed, with result null, unless told otherwise)."""
    return Attempt(job.id, job.attempts, outcome, "null")


async def stored(store: Store, job_id: str, queue: str = Q) -> Job:
    """The job's record as the store has it now; fails the test if there is none."""
    found = await store.get_job(job_id, [queue])
    assert found is not None, f"no job {job_id} in queue {queue}"
    return found


class Clock:
    """Epoch milliseconds that move only when the test says so."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def toml_value(value: Any) -> str:
    """A TOML value: JSON spells strings, numbers and arrays as TOML does; not booleans."""
    return str(value).lower() if isinstance(value, bool) else orjson.dumps(value).decode()


def write_daemon_config(path: Path, port: int, **sections: Mapping[str, Any]) -> Path:
    """Write a TOML config for a daemon process listening on 127.0.0.1:`port`, and return
    `path`. Each section is a table; one whose values are all tables (handlers) is written
    as its subtables, e.g. handlers={"sleep": {"builtin": "sleep"}} as [handlers.sleep]."""
    server = {"listen": f"127.0.0.1:{port}", **sections.pop("server", {})}
    lines: list[str] = []
    for name, table in {"server": server, **sections}.items():
        if table and all(isinstance(value, Mapping) for value in table.values()):
            for sub, values in table.items():
                lines += _table(f"{name}.{sub}", values)
        else:
            lines += _table(name, table)
    path.write_text("\n".join(lines))
    return path


def _table(name: str, values: Mapping[str, Any]) -> list[str]:
    return [f"[{name}]", *(f"{key} = {toml_value(value)}" for key, value in values.items()), ""]


def shipped_config(tmp_path: Path, port: int) -> Path:
    """The shipped config/taskd.toml, changed only to listen on a free port."""
    text = (REPO / "config" / "taskd.toml").read_text()
    text, replaced = re.subn(
        r'(?m)^listen = "127\.0\.0\.1:7700"', f'listen = "127.0.0.1:{port}"', text
    )
    assert replaced == 1
    path = tmp_path / "taskd.toml"
    path.write_text(text)
    return path
