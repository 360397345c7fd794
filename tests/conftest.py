"""Shared fixtures: one real redis-server for the session, a clean database per test, and
a PostgreSQL server for the archive's tests, started only when one asks for it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from taskd.bench.postgres import PostgresServer
from taskd.daemon import Daemon
from taskd.embedded import RedisServer
from taskd.store import Inspector, Store
from taskd.store.record import RECORD_VERSION
from tests.cluster import RedisCluster
from tests.ports import free_port as free_port_now
from tests.proxy import Proxy
from tests.support import Api, DaemonApi, base_url, make_config, running_daemon


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Call it for a free TCP port, e.g. for a daemon a test starts (see tests/ports.py)."""
    return free_port_now


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server on TCP; no AOF, since no test restarts this one."""
    data_dir = tmp_path_factory.mktemp("redis")
    server = RedisServer.start_on_free_port(data_dir=data_dir, timeout=30, appendonly=False)
    yield server
    server.stop()


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own with 8 MB of memory and no eviction, for a test to fill
    (support.fill): past that, it refuses writes."""
    server = RedisServer.start_on_free_port(
        data_dir=tmp_path / "small-redis",
        timeout=30,
        appendonly=False,
        extra_args=["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"],
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """The session's Redis Cluster: three masters on 127.0.0.1, no replicas, no AOF."""
    cluster = RedisCluster(data_dir=tmp_path_factory.mktemp("cluster"))
    cluster.start(timeout=30)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster) -> str:
    """URL of one node of the session cluster, every master flushed before the test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, flushed so every test starts with an empty database."""
    with Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[AsyncRedis]:
    """An asyncio client on the clean database, closed after the test."""
    client = AsyncRedis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    """A store on the clean database (two blocking connections), closed after the test. It
    writes this taskd's record layout, as a daemon's store does once its first heartbeat
    has found no older daemon (tests of the older layouts set record_version)."""
    store = Store.from_url(redis_url, prefix="taskd", blocking_connections=2)
    store.record_version = RECORD_VERSION
    yield store
    await store.close()


@pytest.fixture
async def proxy(redis_url: str, redis_server: RedisServer) -> AsyncIterator[Proxy]:
    """A proxy in front of the session's (flushed) Redis."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    middle = Proxy("127.0.0.1", port)
    await middle.start()
    yield middle
    await middle.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "daemon_config(**sections): the config sections the `daemon` and `api` fixtures' "
        "daemon has over the usual test config (make_config)",
    )


@pytest.fixture
def inspector(store: Store) -> Inspector:
    """The reads on the store's connection."""
    return Inspector(connection=store.connection)


@pytest.fixture
def daemon_api(redis_url: str) -> DaemonApi:
    """`async with daemon_api(**sections) as (daemon, api)`: a daemon on the clean database
    with the usual test config and these sections over it, and a session to it."""

    @asynccontextmanager
    async def start(**sections: Mapping[str, Any]) -> AsyncIterator[tuple[Daemon, Api]]:
        async with (
            running_daemon(make_config(redis_url, **sections)) as daemon,
            aiohttp.ClientSession() as session,
        ):
            yield daemon, (session, base_url(daemon))

    return start


@pytest.fixture
async def _daemon_and_api(
    request: pytest.FixtureRequest, daemon_api: DaemonApi
) -> AsyncIterator[tuple[Daemon, Api]]:
    marker = request.node.get_closest_marker("daemon_config")
    async with daemon_api(**(marker.kwargs if marker else {})) as started:
        yield started


@pytest.fixture
def daemon(_daemon_and_api: tuple[Daemon, Api]) -> Daemon:
    """A daemon on the clean database: the usual test config, with a test module's
    `pytestmark = pytest.mark.daemon_config(**sections)` over it."""
    return _daemon_and_api[0]


@pytest.fixture
def api(_daemon_and_api: tuple[Daemon, Api]) -> Api:
    """A session to the `daemon` fixture's daemon, and its base URL."""
    return _daemon_and_api[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server, for the archive's tests; each takes a database."""
    server = PostgresServer(port=free_port_now())
    try:
        server.start()
        yield server
        server.stop()
    finally:
        server.remove()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, with a database `archive`, which the test may
    stop and start."""
    server = PostgresServer(port=free_port_now())
    try:
        server.start()
        server.psql("postgres", "CREATE DATABASE archive")
        yield server
        if server.running:  # a test that failed may have left it stopped
            server.stop()
    finally:
        server.remove()


@pytest.fixture
def archive_url(postgres_server: PostgresServer) -> str:
    """URL of a new, empty database of the session's PostgreSQL, for one test."""
    name = f"t{next(_databases)}"
    postgres_server.psql("postgres", f"CREATE DATABASE {name}")
    return postgres_server.url_of(name)


_databases = itertools.count()
