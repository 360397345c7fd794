"""The store: the only code that talks to Redis.

Store writes (the tasks' path), Inspector reads (intake, /stats, /metrics, the dashboard),
both on one Connection (connect.open).
"""

from taskd.store.connect import (
    POOL_SIZE,
    REPLY_PARSER,
    UNAVAILABLE,
    Connection,
    is_full,
    open,
)
from taskd.store.inspect import Footprint, Inspector, Page, Rates, Unhandled
from taskd.store.keys import Keys
from taskd.store.record import ArchiveRecord, Attempt, DaemonInfo, TypeLimits
from taskd.store.store import Archived, Beat, Claimed, ClaimRequest, Store

__all__ = [
    "POOL_SIZE",
    "REPLY_PARSER",
    "UNAVAILABLE",
    "ArchiveRecord",
    "Archived",
    "Attempt",
    "Beat",
    "ClaimRequest",
    "Claimed",
    "Connection",
    "DaemonInfo",
    "Footprint",
    "Inspector",
    "Keys",
    "Page",
    "Rates",
    "Store",
    "TypeLimits",
    "Unhandled",
    "is_full",
    "open",
]
