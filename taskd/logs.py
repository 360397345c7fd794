"""The daemon's log: one line per record on stderr, as key=value text or as JSON."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import orjson

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")

# Every attribute a bare LogRecord has, plus the two Formatter adds: whatever else a
# record carries came from `extra=` and is logged as a field of its own.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}
# The fields this module writes itself; an extra of the same name is renamed, not lost.
_OWN = frozenset({"time", "level", "logger", "msg", "exc", "stack"})

# Chatty at INFO and rarely what an operator looks for. aiohttp.access is off in intake
# anyway (access_log=None), but a stray runner must not log one line per request; redis
# logs connection chatter. At --log-level debug nothing is quieted: that is for digging.
_NOISY = ("aiohttp.access", "redis")

# Backslash escapes that keep a value on one line and unambiguous when quoted. Besides
# the ASCII controls, U+0085/U+2028/U+2029 count: some viewers break lines at them.
_ESCAPES: dict[int, str] = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)},
    **{ord(ch): f"\\u{ord(ch):04x}" for ch in "\x85\u2028\u2029"},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    ord('"'): '\\"',
    ord("\\"): "\\\\",
}


def setup(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every record to `stream` (stderr), one line each, replacing other handlers."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        # journald stamps every line itself; a second time would only cost width.
        formatter = TextFormatter(with_time=not os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.NOTSET if level.lower() == "debug" else logging.WARNING
    for name in _NOISY:
        logging.getLogger(name).setLevel(quiet)


def current() -> tuple[str, str]:
    """The level and format setup() was last given, for a child process to log alike."""
    root = logging.getLogger()
    level = logging.getLevelName(root.level).lower()
    json = any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    return (level if level in LEVELS else "info", "json" if json else "text")


class TextFormatter(logging.Formatter):
    """`time=... level=info logger=taskd.x msg="..." key=value ...`, always one line."""

    def __init__(self, *, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{_key(k)}={_text(v)}" for k, v in _fields(self, record, self.with_time))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, the extras, exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(_fields(self, record, with_time=True))
        try:
            return orjson.dumps(fields, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            # orjson refuses some values outright (integers past 64 bits, for one): rather
            # than lose the record, write those fields as text.
            plain = {k: v if isinstance(v, str) else str(v) for k, v in fields.items()}
            return orjson.dumps(plain).decode()


def _fields(
    formatter: logging.Formatter, record: logging.LogRecord, with_time: bool
) -> Iterator[tuple[str, Any]]:
    """A record's fields in the order they are written."""
    if with_time:
        yield "time", _utc(record)
    yield "level", record.levelname.lower()
    yield "logger", record.name
    yield "msg", record.getMessage()
    for name, value in vars(record).items():
        if name not in _STANDARD:
            yield (f"extra_{name}" if name in _OWN else name), value
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        yield "exc", record.exc_text
    if record.stack_info:
        yield "stack", formatter.formatStack(record.stack_info)


def _utc(record: logging.LogRecord) -> str:
    """The record's time as RFC 3339 in UTC with milliseconds: 2026-11-24T10:00:00.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _key(name: str) -> str:
    # Extra names are attribute names and nearly always identifiers; anything that could
    # split the pair is replaced.
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name) or "_"


def _text(value: Any) -> str:
    """A value for key=value: bare when it can be, else quoted with backslash escapes."""
    text = value if isinstance(value, str) else _as_text(value)
    escaped = text.translate(_ESCAPES)
    if text and escaped == text and " " not in text and "=" not in text:
        return text
    return f'"{escaped}"'


def _as_text(value: Any) -> str:
    """A non-string value as JSON would spell it where that reads best, else its str()."""
    if value is None or isinstance(value, bool):
        return orjson.dumps(value).decode()  # null, true, false
    if isinstance(value, list | tuple | dict):
        try:
            return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            pass  # e.g. an integer past 64 bits inside
    return str(value)
