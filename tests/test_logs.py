"""The log formats: one line per record, as key=value text or JSON, with extras and tracebacks."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from taskd import logs

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@contextmanager
def logging_to(fmt: str, level: str = "info") -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """logs.setup on a StringIO, with the root logger as it was put back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("aiohttp.access", "redis")}
    stream = io.StringIO()
    logs.setup(level, fmt, stream)
    try:
        yield logging.getLogger("taskd.workers"), stream
    finally:
        root.handlers[:], level_was = saved
        root.setLevel(level_was)
        for name, old in noisy.items():
            logging.getLogger(name).setLevel(old)


@pytest.fixture(autouse=True)
def _not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def test_text_is_one_line_of_pairs_with_quoting_and_escapes() -> None:
    with logging_to("text") as (log, stream):
        log.warning("job %s failed: %s", "01a", 'boom\nsecond "line" a=b \\ end')
        log.info("")
    first, second = stream.getvalue().splitlines()
    assert re.fullmatch(
        rf'time={TIME} level=warning logger=taskd.workers msg="job 01a failed: boom\\nsecond '
        r'\\"line\\" a=b \\\\ end"',
        first,
    ), first
    assert second.endswith('level=info logger=taskd.workers msg=""')


def test_text_carries_extra_fields_after_the_message() -> None:
    with logging_to("text") as (log, stream):
        log.info(
            "claimed",
            extra={"job_id": "01a2", "queue": "default", "attempt": 2, "note": "two words"},
        )
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert line.rstrip("\n").endswith(
        'msg=claimed job_id=01a2 queue=default attempt=2 note="two words"'
    )


def test_text_puts_the_traceback_on_the_same_line() -> None:
    with logging_to("text") as (log, stream):
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            log.exception("handler crashed", extra={"job_id": "01a2"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert (
        'msg="handler crashed" job_id=01a2 exc="Traceback (most recent call last):\\n' in lines[0]
    )
    assert lines[0].endswith('ValueError: bad\\nvalue"')


def test_under_journald_text_leaves_the_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    with logging_to("text") as (log, stream):
        log.info("started")
    assert stream.getvalue() == "level=info logger=taskd.workers msg=started\n"


def test_json_is_one_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")  # JSON keeps its time regardless
    with logging_to("json", level="debug") as (log, stream):
        log.debug("job %s started", "01a2", extra={"job_id": "01a2", "queue": "default"})
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.error("job failed\nbadly", exc_info=True, extra={"time": "mine"})
    started, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert re.fullmatch(TIME, started.pop("time"))
    assert started == {
        "level": "debug",
        "logger": "taskd.workers",
        "msg": "job 01a2 started",
        "job_id": "01a2",
        "queue": "default",
    }
    assert (failed["level"], failed["msg"]) == ("error", "job failed\nbadly")
    assert failed["exc"].startswith("Traceback (most recent call last):\n")
    assert failed["exc"].endswith("ZeroDivisionError: division by zero")
    # An extra named like one of the fields is kept under another name, not clobbering it.
    assert failed["extra_time"] == "mine"
    assert re.fullmatch(TIME, failed["time"])


def test_json_writes_values_it_cannot_encode_as_text() -> None:
    with logging_to("json") as (log, stream):
        log.info("odd", extra={"big": 2**70, "thing": object()})
    record = json.loads(stream.getvalue())
    assert record["big"] == str(2**70)
    assert record["thing"].startswith("<object object at")


def test_level_filters_and_third_party_chatter_is_quieted() -> None:
    with logging_to("text", level="info") as (log, stream):
        log.debug("hidden")
        logging.getLogger("redis.connection").info("chatter")
        logging.getLogger("redis.connection").warning("worth seeing")
    assert stream.getvalue().count("\n") == 1
    assert "worth seeing" in stream.getvalue()
    with logging_to("text", level="debug") as (log, stream):
        logging.getLogger("redis.connection").debug("everything when digging")
    assert "everything when digging" in stream.getvalue()


def test_setup_replaces_the_handlers_it_finds() -> None:
    with logging_to("text") as (log, first), logging_to("json") as (_, second):
        log.info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "once"


@pytest.mark.parametrize(("fmt", "level"), [("json", "warning"), ("text", "debug")])
def test_current_says_what_setup_was_given_for_a_child_to_log_alike(fmt: str, level: str) -> None:
    with logging_to(fmt, level=level):
        assert logs.current() == (level, fmt)
