"""The archive's answers to the HTTP API: GET /archive, and GET /jobs/ID for a job Redis no
longer holds; each read bounded in time, an unreachable database a 503 of its own."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from taskd.jobs import Job
from taskd.validation import ApiError, ArchiveQuery, parse_archive_query, valid_job_id

if TYPE_CHECKING:  # psycopg, which it imports, is the optional archive extra
    from taskd.archive import Archive, Filters

logger = logging.getLogger(__name__)

# Longest an HTTP request waits for the archive, in seconds. Shorter than the pool's own
# wait for a connection (10 s, archive.db.TIMEOUT), which suits the archiver's batches
# better than a person at a dashboard; longer than [redis] request_timeout, since a read
# that filters on the payload over months of jobs may take a few seconds.
READ_TIMEOUT = 5.0
# Of it, the longest a read waits for a connection. The pool gives up by itself (the
# usual outage: PostgreSQL down, no connection to be had); the whole read's bound, a
# cancellation, is left for a query that hangs: a pool's waiting clients cancelled at
# the wrong moment have lost connections in psycopg_pool releases (psycopg#1208, #1345).
CONNECTION_WAIT = 4.0

T = TypeVar("T")


class ArchiveReads:
    """What the HTTP API reads from the archive, or answers without one (`archive` None)."""

    def __init__(
        self,
        *,
        archive: Archive | None,
        timeout: float = READ_TIMEOUT,
        connection_wait: float = CONNECTION_WAIT,
    ) -> None:
        self._archive = archive
        self._timeout = timeout
        self._wait = min(connection_wait, timeout)
        # Here, not at the top: psycopg is installed only with an archive to read.
        self._unreachable, self._unmigrated = _errors() if archive is not None else ((), ())

    @property
    def configured(self) -> bool:
        return self._archive is not None

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """The job's latest archived final attempt as GET /jobs/ID shows it, or None (not
        archived, or no archive)."""
        if self._archive is None or not valid_job_id(job_id):
            # Not a job id: nothing archived has it, and PostgreSQL would refuse some (NUL).
            return None
        job = await self._read(partial(self._archive.get, job_id, wait=self._wait))
        return None if job is None else archived(job)

    async def page(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The GET /archive answer for these query parameters."""
        if self._archive is None:
            raise ApiError(
                404,
                "archive_not_configured",
                "this daemon has no archive: finished jobs are kept in PostgreSQL only with"
                " [archive] url set",
            )
        query = parse_archive_query(params)
        found = await self._read(
            partial(self._archive.page, _filters(query), query.limit, query.cursor, wait=self._wait)
        )
        if found is None:
            return {"jobs": [], "next_cursor": None}
        return {"jobs": [archived(job) for job in found.jobs], "next_cursor": found.next_cursor}

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call()` within READ_TIMEOUT; None if the archive has no table yet (no archiver
        has migrated it: nothing is archived)."""
        try:
            with anyio.fail_after(self._timeout):
                return await call()
        except TimeoutError:
            logger.warning("the archive did not answer within %g s", self._timeout)
            raise _unavailable(
                f"the archive (PostgreSQL) did not answer within {self._timeout:g} s"
            ) from None
        except self._unmigrated:
            return None
        except self._unreachable as exc:
            logger.warning("the archive is unreachable: %s", exc)
            raise _unavailable(
                "the archive (PostgreSQL) is unreachable; see the daemon's log"
            ) from None


def archived(job: Job) -> dict[str, Any]:
    """An archived job as the API shows it: the job document, marked as from the archive."""
    return {**job.to_public(), "archived": True}


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "archive_unavailable", message)


def _filters(query: ArchiveQuery) -> Filters:
    from taskd.archive import Filters  # the optional extra, as above

    return Filters(
        type=query.job_type,
        queue=query.queue,
        state=query.state,
        since=query.since,
        until=query.until,
        contains=query.contains,
    )


def _errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """The errors of a database that cannot be reached (a connection refused or broken, or
    none in the pool in time), and of one whose table does not exist yet."""
    import psycopg
    from psycopg import errors

    return (psycopg.OperationalError, psycopg.InterfaceError), (errors.UndefinedTable,)
