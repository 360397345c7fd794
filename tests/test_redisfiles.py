"""What data_dir holds against what a redis-server reads: RDB formats and AOF layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskd.redisfiles import rdb_format, unreadable

R62, R70, R72, R74, R84 = (6, 2, 14), (7, 0, 15), (7, 2, 4), (7, 4, 2), (8, 4, 0)
# A plain append-only file starts with commands, not an RDB header.
COMMANDS = b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n"


def rdb(fmt: int) -> bytes:
    """The start of an RDB of format `fmt`: what the check reads."""
    return b"REDIS%04d\xfa\x09redis-ver" % fmt


def holding(data_dir: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = data_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return data_dir


@pytest.mark.parametrize(
    ("version", "files"),
    [
        (R62, {}),
        (R62, {"appendonly.aof": COMMANDS}),
        (R62, {"appendonly.aof": rdb(9) + COMMANDS, "dump.rdb": rdb(9)}),
        (R70, {"appendonlydir/appendonly.aof.1.base.rdb": rdb(10)}),
        (R72, {"appendonlydir/appendonly.aof.1.base.rdb": rdb(11), "dump.rdb": rdb(9)}),
        (R74, {"appendonlydir/appendonly.aof.3.base.rdb": rdb(12)}),
        (R84, {"dump.rdb": rdb(12)}),
        # Newer than the known releases: the server knows its own formats.
        ((9, 0, 0), {"dump.rdb": rdb(80)}),
        # Redis 7 moved a Redis 6 appendonly.aof into the directory; an empty one is nothing.
        (R72, {"appendonlydir/appendonly.aof.1.base.aof": COMMANDS, "appendonly.aof": b""}),
    ],
)
def test_what_the_server_reads_passes(
    tmp_path: Path, version: tuple[int, int, int], files: dict[str, bytes]
) -> None:
    assert unreadable(holding(tmp_path, files), version) is None


@pytest.mark.parametrize(
    ("version", "files", "problem"),
    [
        (
            R62,
            {"appendonlydir/appendonly.aof.1.base.rdb": rdb(9)},
            "appendonlydir/ is the append-only file of Redis 7.0 or newer, which Redis 6.2.14 "
            "does not read: it would start empty",
        ),
        (
            R62,
            {"appendonly.aof": rdb(11) + COMMANDS},
            "appendonly.aof is in RDB format 11, written by Redis 7.2 or newer; Redis 6.2.14 "
            "reads format 9 at most",
        ),
        (
            R62,
            {"dump.rdb": rdb(10)},
            "dump.rdb is in RDB format 10, written by Redis 7.0 or newer; Redis 6.2.14 reads "
            "format 9 at most",
        ),
        (
            R70,
            {"appendonlydir/appendonly.aof.2.base.rdb": rdb(12)},
            "appendonlydir/appendonly.aof.2.base.rdb is in RDB format 12, written by Redis 7.4 "
            "or newer; Redis 7.0.15 reads format 10 at most",
        ),
        (
            R84,
            {"dump.rdb": rdb(13)},
            "dump.rdb is in RDB format 13, written by Redis 8.6 or newer; Redis 8.4.0 reads "
            "format 12 at most",
        ),
        (
            R74,
            {"dump.rdb": rdb(80)},
            "dump.rdb is in RDB format 80, written by a Redis newer than taskd knows; Redis "
            "7.4.2 reads format 12 at most",
        ),
        (
            R72,
            {"appendonlydir/appendonly.aof.1.base.rdb": rdb(11), "appendonly.aof": COMMANDS},
            "appendonly.aof (of Redis 6) and ",
        ),
    ],
)
def test_what_the_server_cannot_read_is_named(
    tmp_path: Path, version: tuple[int, int, int], files: dict[str, bytes], problem: str
) -> None:
    found = unreadable(holding(tmp_path, files), version)
    assert found is not None
    assert f"{tmp_path}/{problem}" in found


def test_rdb_format_reads_the_header_only(tmp_path: Path) -> None:
    holding(tmp_path, {"a": rdb(11), "b": COMMANDS, "c": b"REDIS", "d": b"REDISxxxx"})
    assert [rdb_format(tmp_path / n) for n in "abcd"] == [11, None, None, None]
    assert rdb_format(tmp_path / "missing") is None
    assert rdb_format(tmp_path) is None  # a directory
