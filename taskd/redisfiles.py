"""The embedded Redis's files: whether its redis-server can read what data_dir holds."""

from __future__ import annotations

import re
from pathlib import Path

# The RDB format each Redis reads at most, from the release that brought it in. Redis
# reads every older format too. Valkey 7.2 to 8.1 write format 11 under the same version
# numbers. Past the last release listed, what a server reads is not known here.
_RDB_FORMATS = (((6, 2), 9), ((7, 0), 10), ((7, 2), 11), ((7, 4), 12), ((8, 6), 13))
_RDB_HEADER = re.compile(rb"REDIS([0-9]{4})")
# Redis 7.0 keeps its append-only file as a directory of parts, where 6.2 kept one file.
AOF_DIR = "appendonlydir"
AOF_FILE = "appendonly.aof"
MULTI_PART_AOF = (7, 0)


def unreadable(data_dir: Path, version: tuple[int, int, int]) -> str | None:
    """Why a redis-server of `version` would not load what `data_dir` holds (refuse to
    start, or worse, start empty beside it), or None when it would."""
    aof_dir, aof_file = data_dir / AOF_DIR, data_dir / AOF_FILE
    if aof_dir.is_dir() and version[:2] < MULTI_PART_AOF:
        # Redis 6.2 looks for appendonly.aof alone: it would start empty, and write anew.
        return (
            f"{aof_dir}/ is the append-only file of Redis 7.0 or newer, which Redis "
            f"{_dotted(version)} does not read: it would start empty"
        )
    if aof_dir.is_dir() and aof_file.is_file() and aof_file.stat().st_size > 0:
        # Redis 7 reads the directory only; a file beside it was written by a Redis 6 that
        # ran afterwards (having ignored the directory), and would now be ignored in turn.
        return (
            f"{aof_file} (of Redis 6) and {aof_dir}/ (of Redis 7.0 or newer) both hold data, "
            "and a Redis reads only one of them"
        )
    readable = _newest_format(version)
    if readable is None:
        return None  # a server newer than this list: it knows its formats, and says so
    for path in (data_dir / "dump.rdb", aof_file, *sorted(aof_dir.glob("*.rdb"))):
        written = rdb_format(path)
        if written is not None and written > readable:
            return (
                f"{path} is in RDB format {written}, written by {_writer(written)}; "
                f"Redis {_dotted(version)} reads format {readable} at most"
            )
    return None


def rdb_format(path: Path) -> int | None:
    """The RDB format of a file that starts with an RDB header ("REDIS0011"), else None:
    an RDB snapshot, or an append-only file with an RDB preamble."""
    try:
        with path.open("rb") as f:
            found = _RDB_HEADER.match(f.read(9))
    except (FileNotFoundError, IsADirectoryError):
        return None
    return int(found[1]) if found else None


def _newest_format(version: tuple[int, int, int]) -> int | None:
    if version[:2] > _RDB_FORMATS[-1][0]:
        return None
    known = [fmt for since, fmt in _RDB_FORMATS if since <= version[:2]]
    return known[-1] if known else _RDB_FORMATS[0][1]


def _writer(fmt: int) -> str:
    since = next((since for since, most in _RDB_FORMATS if most >= fmt), None)
    return f"Redis {_dotted(since)} or newer" if since else "a Redis newer than taskd knows"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))
