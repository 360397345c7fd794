"""The Lua scripts: each loaded once, behind the shared preludes it needs."""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis.asyncio as aioredis

# Every script the store runs (lua/<name>.lua). The Inspector runs read_pages.lua.
NAMES = (
    "enqueue", "claim", "ack", "requeue", "promote", "cancel", "retry", "delete",
    "recover", "trim", "beat", "forget", "progress", "schedule", "take_callbacks",
    "callback_done", "free_held", "forget_queue", "archive_lease", "archive_done", "purge",
    "retry_dead", "unindex_gone",
)  # fmt: skip

# Preludes, in the order they go in front of a script: lib.lua before every script,
# limits.lua (claim's per-type limits) and index.lua (the paged index) only before those
# named here.
_PRELUDES: dict[str, tuple[str, ...]] = {
    "claim": ("limits",),
    **{
        name: ("index",)
        for name in (
            "enqueue",
            "trim",
            "delete",
            "purge",
            "forget_queue",
            "read_pages",
            "unindex_gone",
        )
    },
}


def source(name: str) -> str:
    """The text Redis runs for one script: its preludes, then the script."""
    lua = resources.files("taskd.store").joinpath("lua")
    # Redis 6.2 scripts cannot include one another, so the shared text is prepended.
    parts = ("lib", *_PRELUDES.get(name, ()), name)
    return "".join(lua.joinpath(f"{part}.lua").read_text() for part in parts)


def load(client: aioredis.Redis) -> dict[str, Any]:
    """Every script, registered on this client.

    register_script runs EVALSHA and reloads the script by itself after NOSCRIPT (a
    restarted or flushed Redis), so the script text crosses the wire once.
    """
    return {name: client.register_script(source(name)) for name in NAMES}
