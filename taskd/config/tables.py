"""Reading one TOML table: typed getters that gather problems under key paths."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from typing import Any

from taskd.config.model import defaults_of, keys_of

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# A getter's default when none is passed: the schema's, taken from its dataclass.
_SCHEMA: Any = object()


class ConfigError(Exception):
    """A config file that cannot be used; carries every problem found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        # Both go to Exception so the error survives pickling (e.g. across processes).
        super().__init__(source, problems)
        self.source = source
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {problem}" for problem in self.problems)


class Table:
    """One TOML table being read: typed getters that note problems under key paths.

    With a `schema` (a section's dataclass), its fields are the known keys and give each
    getter its default; without one, the table knows `known`, or else every key it has
    (env, weights: tables whose keys are names).
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        problems: list[str],
        *,
        schema: type[Any] | None = None,
        known: tuple[str, ...] | None = None,
    ) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.bad: set[str] = set()  # keys already reported, so checks across keys skip them
        self._defaults = defaults_of(schema) if schema is not None else {}
        if known is None:
            known = keys_of(schema) if schema is not None else tuple(data)
        for key in data:
            if key not in known:
                problems.append(f"{self.key(key)}: unknown key (known: {', '.join(known)})")

    def key(self, name: str) -> str:
        return join(self.path, name)

    def default(self, name: str) -> Any:
        """The default of key `name`, as its schema's dataclass gives it."""
        return self._defaults[name]

    def problem(self, name: str, text: str, *, suffix: str = "") -> None:
        self.bad.add(name)
        self.problems.append(f"{self.key(name)}{suffix}: {text}")

    def table(self, name: str, *, schema: type[Any] | None = None) -> Table:
        """Subtable `name` (empty if absent): of `schema`, else one whose keys are names."""
        value = self.data.get(name, {})
        if not isinstance(value, Mapping):
            self.problem(name, f"must be a table, got {describe(value)}")
            value = {}
        return Table(value, self.key(name), self.problems, schema=schema)

    def _fallback(self, name: str, default: Any) -> Any:
        return self.default(name) if default is _SCHEMA else default

    def integer(self, name: str, low: int, high: int | None = None, default: Any = _SCHEMA) -> int:
        default = self._fallback(name, default)
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, f"must be an integer, got {describe(value)}")
            return int(default)
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            self.problem(name, f"must be an integer {span}, got {value}")
            return int(default)
        return value

    def optional_integer(self, name: str, low: int, high: int | None = None) -> int | None:
        """The integer, or None where the key is not given."""
        return self.integer(name, low, high, default=low) if name in self.data else None

    def boolean(self, name: str) -> bool:
        default: bool = self.default(name)
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false, got {describe(value)}")
            return default
        return value

    def seconds(self, name: str, most: float | None = None) -> float:
        default: float = self.default(name)
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(name, f"must be a number of seconds, got {describe(value)}")
            return default
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not (math.isfinite(seconds) and seconds > 0 and (most is None or seconds <= most)):
            span = "greater than 0" + (f" and at most {most:.15g}" if most is not None else "")
            self.problem(name, f"must be a number of seconds {span}, got {value}")
            return default
        return seconds

    def string(self, name: str, default: Any = _SCHEMA) -> str:
        default = self._fallback(name, default)
        value = self.data.get(name, default)
        if not isinstance(value, str):
            self.problem(name, f"must be a string, got {describe(value)}")
            return str(default)
        return value

    def strings(
        self, name: str, what: str, *, empty: bool = False, default: Any = _SCHEMA
    ) -> tuple[str, ...]:
        default = self._fallback(name, default)
        value = self.data.get(name, default)
        if not isinstance(value, list | tuple) or (not value and not empty):
            rule = "an array" if empty else "a non-empty array"
            self.problem(name, f"must be {rule} of {what}, got {describe(value)}")
            return tuple(default)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.problem(
                    name, f"must be a non-empty string, got {describe(item)}", suffix=f"[{i}]"
                )
        return tuple(default) if name in self.bad else tuple(value)

    def integers(self, name: str, low: int, high: int, what: str) -> tuple[int, ...]:
        value = self.data.get(name, ())
        if not isinstance(value, list | tuple):
            self.problem(name, f"must be an array of {what}, got {describe(value)}")
            return ()
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                text = f"must be an integer, got {describe(item)}"
            elif not low <= item <= high:
                text = f"must be an integer from {low} to {high}, got {item}"
            else:
                continue
            self.problem(name, text, suffix=f"[{i}]")
        return () if name in self.bad else tuple(value)


def join(path: str, key: str) -> str:
    """A key path as TOML would spell it, quoting keys that are not bare."""
    key = str(key)
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def describe(value: Any) -> str:
    """A value as a TOML user knows it, for "got ..." in messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{'integer' if isinstance(value, int) else 'float'} {value}"
    if isinstance(value, str):
        shown = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
        return f"string {shown}"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, datetime | date | time):
        return f"datetime {value.isoformat()}"
    return type(value).__name__
