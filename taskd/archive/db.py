"""The archive database: migrations, the archiver's batched writes, the API's reads."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from taskd.archive.schema import LOCK_KEY, MIGRATIONS, TABLE, VERSIONS
from taskd.jobs import Job
from taskd.store import ArchiveRecord

logger = logging.getLogger(__name__)

# Connections at most: the archiver's writes and the API's reads; PostgreSQL is not the
# hot path, and a few keep its per-connection memory small.
POOL_SIZE = 4
# Longest a read or write waits for a connection, or a statement runs, in seconds: an
# outage must show as an error soon, not hang the API or the archiver.
TIMEOUT = 10.0
# Longest dropping a partition waits for the reads of the table to end, in seconds: the
# statements that come meanwhile wait behind it. One that gives up is tried again at the
# next expiry (archiver.EXPIRE_INTERVAL_MS).
DROP_LOCK_TIMEOUT = 1.0
# Most rows GET /archive answers at once.
MAX_PAGE = 1000
DAY = timedelta(days=1)
_DAY_MS = 86_400_000
# The staging table the archiver COPYs a batch into: the job's id and queue, then its
# record.ARCHIVED values in their order (a test holds them equal), as Redis has them: times
# as epoch ms and JSON as text, for PostgreSQL to convert in C. Private to the connection
# and emptied at each commit.
_STAGING = """
    CREATE TEMPORARY TABLE IF NOT EXISTS taskd_jobs_in (
        id text, queue text, type text, state text, attempts integer, payload text,
        result text, error text, priority smallint, idempotency_key text,
        max_attempts integer, created_at bigint, started_at bigint, finished_at bigint,
        daemon text, callback_url text, history text
    ) ON COMMIT DELETE ROWS
"""
_COPY_IN = "COPY taskd_jobs_in FROM STDIN"
_EPOCH_MS = "timestamptz 'epoch' + {} * interval '1 millisecond'"
_INSERT = f"""
    INSERT INTO {TABLE} (
        id, attempts, finished_at, queue, type, state, payload, result, error, priority,
        idempotency_key, max_attempts, created_at, started_at, daemon, callback_url, history
    )
    SELECT id, attempts, {_EPOCH_MS.format("finished_at")}, queue, type, state,
        payload::jsonb, result::jsonb, error, priority, idempotency_key, max_attempts,
        {_EPOCH_MS.format("created_at")}, {_EPOCH_MS.format("started_at")}, daemon,
        callback_url, history::jsonb
    FROM taskd_jobs_in
    ON CONFLICT DO NOTHING
"""
_COLUMNS = (
    "id", "attempts", "finished_at", "queue", "type", "state", "payload", "result",
    "error", "priority", "idempotency_key", "max_attempts", "created_at", "started_at",
    "daemon", "callback_url", "history",
)  # fmt: skip
# A JSON "\u0000" escape that is not itself escaped: PostgreSQL's jsonb cannot hold it.
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


@dataclass(frozen=True, slots=True, kw_only=True)
class Filters:
    """What GET /archive lists: each given filter must match (None: any)."""

    type: str | None = None
    queue: str | None = None
    state: str | None = None
    since: int | None = None  # finished at or after, epoch ms
    until: int | None = None  # finished before, epoch ms
    contains: str | None = None  # JSON text of a value the payload contains (jsonb @>)


@dataclass(frozen=True, slots=True)
class ArchivePage:
    """One page of archived jobs, newest first, and the cursor of the next (None: last)."""

    jobs: list[Job]
    next_cursor: str | None


class Archive:
    """The archive database of one daemon, through a small pool of connections.

    Nothing here waits for PostgreSQL at start: the pool connects in the background, and
    each call fails (psycopg.Error, or psycopg_pool.PoolTimeout) while the database is
    unreachable, for its caller to retry: the archive is never the hot path.
    """

    def __init__(self, *, url: str, keep_days: int) -> None:
        self._keep_days = keep_days
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=POOL_SIZE,
            open=False,
            timeout=TIMEOUT,
            # UTF-8 whatever PGCLIENTENCODING or the URL says: the COPY data is.
            kwargs={
                "autocommit": True,
                "connect_timeout": int(TIMEOUT),
                "client_encoding": "UTF8",
            },
            check=AsyncConnectionPool.check_connection,
            configure=_configure,
        )
        self._days: set[datetime] = set()  # partitions known to exist
        self._migrated = False

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def migrate(self) -> int:
        """Apply the migrations not applied yet, in one transaction under an advisory
        lock (daemons that start at once take turns); returns the version now."""
        async with self._pool.connection() as conn, conn.transaction():
            # A migration may build an index over millions of rows, and the daemons that
            # start meanwhile wait for it here.
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            await _check_encoding(conn)
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(VERSIONS))
            )
            cursor = await conn.execute(
                sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(sql.Identifier(VERSIONS))
            )
            row = await cursor.fetchone()
            current = int(row[0]) if row else 0
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"the archive's schema is version {current}, newer than this taskd "
                    f"knows ({len(MIGRATIONS)}): upgrade taskd"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                await conn.execute(MIGRATIONS[version - 1])
                await conn.execute(
                    sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(
                        sql.Identifier(VERSIONS)
                    ),
                    (version,),
                )
                logger.info("archive schema migrated to version %d", version)
        self._migrated = True
        return len(MIGRATIONS)

    async def write(self, records: Sequence[ArchiveRecord]) -> None:
        """Write final jobs, one row per final attempt, in one transaction: COPY into a
        staging table, then one INSERT from it; a row already there (an entry written
        twice) is left as it is."""
        if not records:
            return
        if not self._migrated:
            await self.migrate()
        days = {_time(day * _DAY_MS) for day in {r.finished_at // _DAY_MS for r in records}}
        await self._ensure_days(days)
        data = b"".join(map(_copy_line, records))
        try:
            await self._insert(data)
        except psycopg.errors.CheckViolation:
            # No partition for a row: another daemon's expiry dropped one this process
            # made (a job that ended over keep_days ago, archived after an outage).
            self._days -= days
            await self._ensure_days(days)
            await self._insert(data)

    async def _insert(self, data: bytes) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_STAGING)
            async with conn.cursor().copy(_COPY_IN) as copy:
                await copy.write(data)
            await conn.execute(_INSERT)

    async def ensure_partitions(self, first_ms: int, last_ms: int) -> None:
        """The day partitions from the day of `first_ms` to that of `last_ms` (epoch ms),
        made if missing: the write path makes those it needs, this is for a bulk load."""
        day, last = _day_of(first_ms), _day_of(last_ms)
        days = set()
        while day <= last:
            days.add(day)
            day += DAY
        await self._ensure_days(days)

    async def _ensure_days(self, days: set[datetime]) -> None:
        missing = days - self._days
        if not missing:
            return
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            for day in sorted(missing):
                await _make_partition(conn, day)
        self._days |= missing

    async def drop_expired(self, now_ms: int) -> list[str]:
        """Drop the day partitions wholly older than keep_days; returns their names."""
        if not self._keep_days:
            return []
        # A partition's day ends before the cutoff: every row in it is past keep_days.
        cutoff = _time(now_ms) - timedelta(days=self._keep_days) - DAY
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            cursor = await conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = %s::regclass",
                (TABLE,),
            )
            names = [str(row[0]) for row in await cursor.fetchall()]
        expired = [name for name in names if _partition_day(name) < cutoff]
        dropped = [name for name in expired if await self._drop(name)]
        self._days = {day for day in self._days if day >= cutoff}  # dropped: made anew if needed
        return dropped

    async def _drop(self, partition: str) -> bool:
        """Drop one partition, unless the reads of the table hold it past DROP_LOCK_TIMEOUT
        (a long report in SQL, say): then it is left for the next expiry."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                await conn.execute(f"SET LOCAL lock_timeout = {int(DROP_LOCK_TIMEOUT * 1000)}")
                # Another daemon's expiry may have dropped it since it was listed.
                await conn.execute(
                    sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(partition))
                )
        except psycopg.errors.LockNotAvailable:
            logger.info("archive partition %s is in use; dropped at the next expiry", partition)
            return False
        return True

    async def get(self, job_id: str, *, wait: float | None = None) -> Job | None:
        """The latest archived final attempt of a job, or None. `wait`: longest to wait
        for a connection (PoolTimeout past it), if shorter than TIMEOUT."""
        statement = sql.SQL(
            "SELECT {columns} FROM {table} WHERE id = %s ORDER BY finished_at DESC LIMIT 1"
        ).format(
            columns=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)), table=sql.Identifier(TABLE)
        )
        async with self._pool.connection(wait) as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(statement, (job_id,))
            row = await cursor.fetchone()
        return None if row is None else _job(row)

    async def page(
        self, filters: Filters, limit: int, cursor: str | None, *, wait: float | None = None
    ) -> ArchivePage:
        """Archived jobs matching `filters`, newest first, after `cursor` (from a previous
        page); keyset pagination on (finished_at, id), which the indexes order (two final
        attempts of one job that ended in the same ms would share a position: one of them
        could be missed at a page's end). `wait` as for get()."""
        where: list[sql.Composable] = []
        params: list[Any] = []
        for name in ("type", "queue", "state"):
            value = getattr(filters, name)
            if value is not None:
                where.append(sql.SQL("{} = %s").format(sql.Identifier(name)))
                params.append(value)
        if filters.since is not None:
            where.append(sql.SQL("finished_at >= %s"))
            params.append(_time(filters.since))
        if filters.until is not None:
            where.append(sql.SQL("finished_at < %s"))
            params.append(_time(filters.until))
        if filters.contains is not None:
            where.append(sql.SQL("payload @> %s::jsonb"))
            # As payloads were written: a NUL in them is U+FFFD in the archive.
            params.append(_NUL_ESCAPE.sub(rb"\1\\ufffd", filters.contains.encode()).decode())
        if cursor is not None:
            finished, job_id = decode_cursor(cursor)
            where.append(sql.SQL("(finished_at, id) < (%s, %s)"))
            params += [_time(finished), job_id]
        statement = sql.SQL(
            "SELECT {columns} FROM {table} {where} ORDER BY finished_at DESC, id DESC LIMIT %s"
        ).format(
            columns=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            table=sql.Identifier(TABLE),
            where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        )
        params.append(limit + 1)
        async with self._pool.connection(wait) as conn:
            rows_cursor = conn.cursor(row_factory=dict_row)
            await rows_cursor.execute(statement, params)
            rows = await rows_cursor.fetchall()
        jobs = [_job(row) for row in rows[:limit]]
        more = len(rows) > limit and jobs
        last = jobs[-1] if more else None
        next_cursor = encode_cursor(last.finished_at or 0, last.id) if last else None
        return ArchivePage(jobs, next_cursor)


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the database is down or does not answer, so that every write
    fails alike until it is back: no connection (PoolTimeout among them), or the server
    shutting down or starting. A statement cancelled at its timeout, a lock not had or a
    full disk are OperationalErrors too, but of one statement."""
    if not isinstance(error, psycopg.OperationalError):
        return False
    state = error.sqlstate
    return state is None or state.startswith(("08", "57P"))


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Each new connection of the pool: the server stops a statement that runs past
    TIMEOUT (a read the API gave up on, too)."""
    await conn.execute(f"SET statement_timeout = {int(TIMEOUT * 1000)}")


async def _make_partition(conn: psycopg.AsyncConnection[Any], day: datetime) -> None:
    """The partition of one day, made unless it is there. Made as a table of its own and
    then attached: CREATE TABLE ... PARTITION OF waits for every read of the table to end,
    and every statement after it waits too (a report in SQL of an hour stopped the
    archive for that hour); ATTACH PARTITION waits for none of them."""
    name = _partition(day)
    cursor = await conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL,"
        " EXISTS (SELECT FROM pg_inherits WHERE inhrelid = to_regclass(%s))",
        (name, name),
    )
    exists, attached = await cursor.fetchone() or (False, False)
    if attached:
        return
    table, partition = sql.Identifier(TABLE), sql.Identifier(name)
    if not exists:  # else one detached by hand: attached again
        await conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                partition, table
            )
        )
    await conn.execute(
        # DDL takes no parameters: the bounds are literals.
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            table,
            partition,
            sql.Literal(day.isoformat()),
            sql.Literal((day + DAY).isoformat()),
        )
    )


async def _check_encoding(conn: psycopg.AsyncConnection[Any]) -> None:
    """Refuse a database that cannot hold every character a job may carry: in any other
    encoding than UTF8, some text would be refused (its batch with it, for ever) or
    garbled."""
    cursor = await conn.execute("SHOW server_encoding")
    row = await cursor.fetchone()
    encoding = str(row[0]) if row else "?"
    if encoding != "UTF8":
        raise RuntimeError(
            f"the archive database's encoding is {encoding}; taskd needs UTF8 "
            "(CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
        )


def encode_cursor(finished_at: int, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{finished_at}:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """A cursor's position; ValueError if it is not one this module made."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        finished, job_id = text.split(":", 1)
        return int(finished), job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a cursor of GET /archive: {cursor!r}") from exc


# COPY's text format: tab between fields, newline after a row, \N for NULL; a backslash,
# tab, newline or carriage return inside a field is escaped with a backslash.
_NULL = b"\\N"
_SPECIAL = re.compile(rb"[\x00\t\n\r\\]")
_ESCAPES = ((b"\\", b"\\\\"), (b"\t", b"\\t"), (b"\n", b"\\n"), (b"\r", b"\\r"))


def _copy_line(r: ArchiveRecord) -> bytes:
    """One record as a line of COPY text, in the staging table's column order."""
    (
        job_type, state, attempts, payload, result, error, priority, idempotency_key,
        max_attempts, created_at, started_at, finished_at, daemon, callback_url, history,
    ) = r.values  # fmt: skip
    fields = (
        r.id.encode(), r.queue.encode(), _text(job_type), state, attempts, _json(payload),
        _json(result), _text(error), priority, _text(idempotency_key), max_attempts,
        created_at, started_at or _NULL, finished_at, _text(daemon), _text(callback_url),
        _json(history),
    )  # fmt: skip
    return b"\t".join(fields) + b"\n"  # type: ignore[arg-type]  # the NOT NULL ones are set


def _json(value: bytes | None) -> bytes:
    """JSON text for jsonb. JSON has no raw tab or line break, so only its backslashes are
    COPY's to escape; and jsonb cannot hold the NUL character: a "\\u0000" escape becomes
    U+FFFD, the replacement character."""
    if value is None:
        return _NULL
    if b"\\" not in value:
        return value
    if b"\\u0000" in value:
        value = _NUL_ESCAPE.sub(rb"\1\\ufffd", value)
    return value.replace(b"\\", b"\\\\")


def _text(value: bytes | None) -> bytes:
    """Text for a text column, escaped for COPY; text cannot hold NUL either: it becomes
    U+FFFD."""
    if value is None:
        return _NULL
    # One scan for the common case, nothing to escape: a fifth of the time of five.
    if _SPECIAL.search(value) is None:
        return value
    if b"\x00" in value:
        value = value.replace(b"\x00", "\ufffd".encode())
    for raw, escaped in _ESCAPES:
        if raw in value:
            value = value.replace(raw, escaped)
    return value


def _job(row: dict[str, Any]) -> Job:
    return Job(
        id=row["id"],
        type=row["type"],
        queue=row["queue"],
        payload=row["payload"],
        state=row["state"],
        attempts=row["attempts"],
        created_at=_ms(row["created_at"]),
        started_at=None if row["started_at"] is None else _ms(row["started_at"]),
        finished_at=_ms(row["finished_at"]),
        result=row["result"],
        error=row["error"],
        daemon=row["daemon"],
        max_attempts=row["max_attempts"],
        history=tuple(row["history"]),
        idempotency_key=row["idempotency_key"],
        callback_url=row["callback_url"],
        priority=row["priority"],
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _time(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def _ms(value: datetime) -> int:
    return (value - _EPOCH) // _MS


def _day_of(ms: int) -> datetime:
    return _time(ms).replace(hour=0, minute=0, second=0, microsecond=0)


def _partition(day: datetime) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


def _partition_day(name: str) -> datetime:
    return datetime.strptime(name.rsplit("_p", 1)[1], "%Y%m%d").replace(tzinfo=UTC)
