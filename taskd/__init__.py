"""taskd: a job scheduler daemon on Redis, and the client of its HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from taskd.client import (
        AsyncClient,
        Client,
        Conflict,
        DaemonError,
        InvalidRequest,
        NotFound,
        TaskdError,
        TransportError,
        Unauthorized,
        Unavailable,
        WaitTimeout,
    )

# What `from taskd import …` offers: the client, imported only when asked for, so that
# `import taskd` (and every module of the daemon) stays as cheap as it was.
__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "DaemonError",
    "InvalidRequest",
    "NotFound",
    "TaskdError",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from taskd import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
