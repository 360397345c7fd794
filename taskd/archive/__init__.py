"""The archive: finished jobs kept in PostgreSQL, after Redis lets them go.

The archiver (taskd.archiver) writes them from Redis's hand-off; the HTTP API reads them.
Only this package talks to PostgreSQL, and it is imported only when [archive] is set: its
driver, psycopg, is the optional `archive` extra.
"""

from taskd.archive.db import Archive, ArchivePage, Filters, unreachable
from taskd.archive.schema import MIGRATIONS, TABLE

__all__ = ["MIGRATIONS", "TABLE", "Archive", "ArchivePage", "Filters", "unreachable"]
