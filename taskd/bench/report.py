"""The bench's figures and results, their statistics, and the report as a table or JSON."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from taskd.store import REPLY_PARSER


@dataclass(frozen=True, slots=True)
class Figure:
    """One number a workload measured in one round."""

    name: str
    unit: str
    value: float


@dataclass(frozen=True, slots=True)
class Result:
    """One figure over all rounds."""

    workload: str
    figure: str
    unit: str
    median: float
    min: float
    max: float
    rounds: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "figure": self.figure,
            "unit": self.unit,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "rounds": list(self.rounds),
        }


@dataclass
class Report:
    machine: dict[str, Any]
    results: list[Result]
    notes: list[str]


def aggregate(workload: str, rounds: Sequence[Sequence[Figure]]) -> list[Result]:
    """One result per figure, in the order first seen: median, min and max over the rounds."""
    values: dict[tuple[str, str], list[float]] = {}
    for figures in rounds:
        for figure in figures:
            values.setdefault((figure.name, figure.unit), []).append(figure.value)
    return [
        Result(workload, name, unit, statistics.median(v), min(v), max(v), tuple(v))
        for (name, unit), v in values.items()
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank, as /stats computes its percentiles."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_figures(
    latencies_ms: Sequence[float], quantiles: Sequence[float] = (0.50, 0.99), suffix: str = ""
) -> list[Figure]:
    """Each quantile (0.999 is "p99.9") and the max, in ms; `suffix` ends their names."""
    return [
        *(Figure(f"p{q * 100:g}{suffix}", "ms", percentile(latencies_ms, q)) for q in quantiles),
        Figure(f"max{suffix}", "ms", max(latencies_ms)),
    ]


def machine(redis_version: str, redis_allocator: str | None = None) -> dict[str, Any]:
    """What the figures depend on besides taskd: CPU, cores, Python, Redis (and its memory
    allocator, where the bench's own Redis tells), loop, parser."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis": redis_version,
        **({"redis_allocator": redis_allocator} if redis_allocator else {}),
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "redis_parser": REPLY_PARSER,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def render(
    report: Report, rounds: int, quick: bool, before: dict[tuple[str, str], float] | None = None
) -> str:
    """The report as a header line and a table, one row per figure, then the notes; with
    `before` (medians of an earlier run, see medians()), each row's also and the change."""
    m = report.machine
    sizes = "quick sizes" if quick else "full sizes"
    header = (
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Redis {m['redis']}"
        f"{f' ({allocator})' if (allocator := m.get('redis_allocator')) else ''}, "
        f"{m['event_loop']}, {m['redis_parser']} parser; {rounds} round(s), {sizes}"
    )
    rows = [["WORKLOAD", "FIGURE", "UNIT", "MEDIAN", "MIN", "MAX"]]
    if before is not None:
        rows[0] += ["BEFORE", "CHANGE"]
    for r in report.results:
        row = [r.workload, r.figure, r.unit, *map(number, (r.median, r.min, r.max))]
        if before is not None:
            row += _change(before.get((r.workload, r.figure)), r.median)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i >= 3 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    notes = [f"note: {text}" for text in report.notes]
    return "\n".join([header, "", *lines, *([""] if notes else []), *notes])


def medians(document: Any) -> dict[tuple[str, str], float]:
    """(workload, figure) -> median, of a report `--json` printed; ValueError if it is not
    one."""
    try:
        return {(r["workload"], r["figure"]): float(r["median"]) for r in document["results"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a report of taskd bench --json ({exc!r})") from None


def _change(before: float | None, after: float) -> list[str]:
    """The BEFORE and CHANGE cells: the earlier median and the change from it, in %."""
    if before is None:
        return ["-", "-"]
    if before == 0:
        return [number(before), "-"]
    return [number(before), f"{(after - before) / abs(before) * 100:+.1f}%"]


def number(value: float) -> str:
    """A figure as the report prints it: thousands separated, decimals by magnitude."""
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def as_json(report: Report) -> str:
    document = {
        "machine": report.machine,
        "results": [result.to_json() for result in report.results],
        "notes": report.notes,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
