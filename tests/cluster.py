"""A real Redis Cluster for tests: three masters, no replicas, started and configured from Python.

Each node is a taskd.embedded.RedisServer (same binary lookup, version check, start-up
wait and parent-death signal) with cluster mode on. The cluster is put together with plain
commands, not redis-cli, which Redis 6.2 packages may lack: CLUSTER SET-CONFIG-EPOCH,
CLUSTER ADDSLOTS (6.2 has no ADDSLOTSRANGE) and CLUSTER MEET.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskd.embedded import EmbeddedRedisError, RedisServer, free_port

log = logging.getLogger(__name__)

SLOTS = 16384
NODES = 3
# Redis 6.2 puts a node's cluster bus on its port + 10000 (no cluster-port option before 7.0).
_BUS_OFFSET = 10000
_POLL_INTERVAL = 0.05


def free_cluster_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago, and whose bus port (+10000) was too."""
    for _ in range(100):
        port = free_port()
        if port + _BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + _BUS_OFFSET))
            except OSError:
                continue
        return port
    raise EmbeddedRedisError("found no free pair of ports (port, port + 10000) on 127.0.0.1")


def slot_ranges(nodes: int = NODES) -> list[range]:
    """The 16384 slots cut into `nodes` contiguous ranges, as redis-cli --cluster create does."""
    bounds = [SLOTS * i // nodes for i in range(nodes + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(nodes)]


class RedisCluster:
    """Three cluster-mode redis-servers on 127.0.0.1, each master of a third of the slots.

    `url` is the first node's, for redis.asyncio.cluster.RedisCluster.from_url;
    `node_urls` are all three, for plain per-node clients (FLUSHALL, CLUSTER NODES...).
    Like RedisServer, call start() from the main thread: the nodes get SIGTERM when the
    thread that started them exits.
    """

    def __init__(
        self, *, data_dir: str | os.PathLike[str], binary: str | None = None, nodes: int = NODES
    ) -> None:
        self._data_dir = Path(data_dir).absolute()
        self._binary = binary
        self._count = nodes
        self._servers: list[RedisServer] = []
        self.ports: list[int] = []

    @property
    def url(self) -> str:
        """The first node's URL (no database part: a cluster has only database 0)."""
        if not self.ports:
            raise RuntimeError("the cluster is not started")
        return f"redis://127.0.0.1:{self.ports[0]}"

    @property
    def node_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}" for port in self.ports]

    @property
    def pids(self) -> list[int | None]:
        return [server.pid for server in self._servers]

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, join them, assign the slots; return once every node says ok."""
        if self._servers:
            raise RuntimeError(f"the cluster in {self._data_dir} is already started")
        deadline = time.monotonic() + timeout
        try:
            for index in range(self._count):
                self._start_node(index, deadline)
            self._join(deadline, timeout)
            self._wait(self._not_ready, deadline, timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Redis Cluster up on ports %s", self.ports)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL); idempotent."""
        servers, self._servers = self._servers, []
        self.ports = []
        for server in servers:
            server.stop()

    def flushall(self) -> None:
        """FLUSHALL on every master: the cluster's keys all gone, its slots still assigned."""
        for url in self.node_urls:
            with self._client(url) as client:
                client.flushall()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_node(self, index: int, deadline: float) -> None:
        data_dir = self._data_dir / f"node{index}"
        # A node started before in this directory left a nodes.conf naming other nodes.
        (data_dir / "nodes.conf").unlink(missing_ok=True)
        server = RedisServer.start_on_free_port(
            data_dir=data_dir,
            timeout=max(1.0, deadline - time.monotonic()),
            pick_port=free_cluster_port,
            binary=self._binary,
            appendonly=False,
            extra_args=[
                *("--cluster-enabled", "yes"),
                *("--cluster-config-file", "nodes.conf"),  # relative to --dir
                *("--cluster-node-timeout", "5000"),
            ],
        )
        assert server.port is not None
        self._servers.append(server)
        self.ports.append(server.port)

    def _join(self, deadline: float, timeout: float) -> None:
        """Introduce every node to every other, wait until all know all, then assign slots.

        Slots go last: a node that hears of a slot-owning master before it can reach it
        counts itself in a minority, and then waits out a rejoin delay (up to 5 s) before
        it says ok. Joined first, the nodes go ok as soon as the slots have spread.
        """
        clients = [self._client(url) for url in self.node_urls]
        try:
            for epoch, client in enumerate(clients, start=1):
                # Distinct epochs up front, as redis-cli does, so the nodes need not
                # settle an epoch collision before they agree on who owns what.
                client.cluster("SET-CONFIG-EPOCH", epoch)
            for client, own in zip(clients, self.ports, strict=True):
                for port in self.ports:
                    if port != own:
                        client.cluster("MEET", "127.0.0.1", port)
            self._wait(lambda: self._not_ready(slots=False), deadline, timeout)
            for client, slots in zip(clients, slot_ranges(self._count), strict=True):
                client.cluster("ADDSLOTS", *slots)  # one call per node: 6.2 has no ranges
        finally:
            for client in clients:
                client.close()

    def _wait(self, not_ready: Callable[[], str], deadline: float, timeout: float) -> None:
        """Poll not_ready() until it says nothing, or raise with its last word at deadline."""
        while pending := not_ready():
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"Redis Cluster on ports {self.ports} not ready within {timeout:.0f}s: "
                    f"{pending}; logs in {self._data_dir}/node*/redis.log"
                )
            time.sleep(_POLL_INTERVAL)

    def _not_ready(self, *, slots: bool = True) -> str:
        """Why the cluster is not ready yet, or "" once every node knows every node.

        With slots: also every node must own slots, and every node say cluster_state:ok.
        """
        for url in self.node_urls:
            with self._client(url) as client:
                try:
                    info: dict[str, str] = client.cluster("INFO")
                    # {"ip:port": {"flags": "myself,master", "connected": True, ...}}
                    nodes: dict[str, dict[str, Any]] = client.cluster("NODES")
                except redis.RedisError as exc:
                    return f"{url}: {exc}"
            if len(nodes) != self._count:
                return f"{url}: knows {len(nodes)} nodes"
            for address, node in nodes.items():
                flags = set(node["flags"].split(","))
                if (
                    address.startswith(":")  # its address not learnt yet
                    or not node["connected"]
                    or flags & {"handshake", "noaddr", "fail", "fail?"}
                    or (slots and not node["slots"])
                ):
                    return f"{url}: {address} not settled: {node}"
            if slots and info.get("cluster_state") != "ok":
                return f"{url}: cluster_state:{info.get('cluster_state')}"
        return ""

    @staticmethod
    def _client(url: str) -> redis.Redis:
        # One attempt per call: the callers poll against their own deadline.
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=1.0,
            socket_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
        )
