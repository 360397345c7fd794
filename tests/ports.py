"""Ports for the daemons and servers the tests start, which no other process takes first.

A port the OS hands out as free (bind to 0) comes from the ephemeral range, the same range
every outgoing connection's local port comes from. Between the test releasing it and the
daemon binding it, a Redis client or HTTP session of any of the suite's workers can take
it, and the daemon fails with "address already in use". The ports here lie below the
ephemeral range, where connections never land, and each pytest-xdist worker has its own
slice of them, so no two workers hand out the same one.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

from taskd.embedded import free_port as ephemeral_port

_LOWEST = 10000
# Ports of the suite's own Redis Cluster nodes carry a bus on port + 10000; stay clear of
# that too, and of the ephemeral range (32768 up, as Linux's default).
_BUS_OFFSET = 10000
_SLICE_MIN = 200


def _ephemeral_low() -> int:
    try:
        low, _high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    except (OSError, ValueError):
        return 32768


def _slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw") or 0)
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    top = _ephemeral_low() - _BUS_OFFSET
    size = (top - _LOWEST) // count
    start = _LOWEST + index * size
    return range(start, start + size)


_PORTS = _slice()
_NEXT = itertools.cycle(_PORTS)


def free_port() -> int:
    """A TCP port on 127.0.0.1, free now and not handed to anyone else by the suite.

    Ports are handed out in turn through this worker's slice, so one is not handed out
    again until thousands of others have been; each is checked free by binding it.
    """
    if len(_PORTS) < _SLICE_MIN:  # an odd ip_local_port_range: fall back to the OS's pick
        return ephemeral_port()
    for _ in range(len(_PORTS)):
        port = next(_NEXT)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")
