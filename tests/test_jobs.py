"""The job record's own helpers: its times as RFC 3339, its UUIDv7 ids."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

from taskd.jobs import format_ms, new_id, now_ms


def test_times_are_rfc3339_utc_with_milliseconds() -> None:
    assert format_ms(None) is None
    assert format_ms(0) == "1970-01-01T00:00:00.000Z"
    assert format_ms(1_765_000_000_123) == "2025-12-06T05:46:40.123Z"
    assert format_ms(-1) == "1969-12-31T23:59:59.999Z"
    # As datetime formats them, over the years jobs are stored in.
    rng = random.Random(7)
    for ms in [rng.randrange(0, 4_102_444_800_000) for _ in range(2000)] + [999, 1000, 1001]:
        moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
        assert format_ms(ms) == moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_ids_are_uuid7_in_the_order_they_were_made() -> None:
    before = now_ms()
    ids = [new_id() for _ in range(5000)]  # more than one read of random bytes
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= now_ms() + 2  # borrowed milliseconds at most
    # The random bits differ from id to id, not only the counter.
    assert len({uuid.UUID(text).int & ((1 << 62) - 1) for text in ids}) == len(ids)
