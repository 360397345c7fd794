"""The Python client of the taskd HTTP API: `Client` (threads), `AsyncClient` (asyncio)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskd.client.address import DEFAULT_URL, Target, locate
from taskd.client.documents import (
    HistoryEntry,
    Job,
    NewJob,
    Page,
    Progress,
    Purged,
    QueueState,
    Retried,
    TraceContext,
)
from taskd.client.errors import (
    AddressError,
    Conflict,
    DaemonError,
    InvalidRequest,
    NotFound,
    RequestTimeout,
    TaskdError,
    TransportError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from taskd.client.sync import Client

if TYPE_CHECKING:
    from taskd.client.aio import AsyncClient

__all__ = [
    "DEFAULT_URL",
    "AddressError",
    "AsyncClient",
    "Client",
    "Conflict",
    "DaemonError",
    "HistoryEntry",
    "InvalidRequest",
    "Job",
    "NewJob",
    "NotFound",
    "Page",
    "Progress",
    "Purged",
    "QueueState",
    "RequestTimeout",
    "Retried",
    "Target",
    "TaskdError",
    "TraceContext",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "locate",
]


def __getattr__(name: str) -> Any:
    # AsyncClient only when asked for: aiohttp takes longer to import than all the rest.
    if name == "AsyncClient":
        from taskd.client.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
