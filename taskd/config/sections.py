"""The [server], [redis], [workers], [retention], [callbacks] and [archive] tables, checked."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from pathlib import Path

from taskd.config.model import (
    QUEUE_MODES,
    QUEUE_NAME,
    QUEUE_RULE,
    ArchiveConfig,
    CallbacksConfig,
    Network,
    RedisConfig,
    RetentionConfig,
    ServerConfig,
    WorkersConfig,
)
from taskd.config.secrets import read_signing_secrets
from taskd.config.tables import Table, describe
from taskd.config.urls import cluster_url_problem, postgres_url_problem, redis_url_problem

_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_BODY = 1 << 30
_MAX_BATCH = 100_000
_MAX_IDEMPOTENCY_TTL = 30 * 86_400.0
# Longer than this, a connection timeout is surely milliseconds written as seconds.
_HOUR = 3600.0
# A file descriptor each: beyond about this, Linux's own default ceiling (nr_open) is hit.
_MAX_CONNECTIONS = 1_000_000
_MAX_REDIS_TIMEOUT = 60.0
_MAX_CONCURRENCY = 100_000
_MAX_WEIGHT = 1000
# Longer than this, a retention is surely milliseconds written as seconds.
_TEN_YEARS = 10 * 365 * 24 * 3600.0
_MAX_KEEP_DAYS = 100 * 365
_CIDR_RULE = 'a network like "10.0.0.0/8" or an address like "10.1.2.3"'


def read_server(t: Table, env_secrets: str) -> ServerConfig:
    listen = t.string("listen")
    max_body = t.integer("max_body", 1, _MAX_BODY)
    max_batch = t.integer("max_batch", 1, _MAX_BATCH)
    idempotency_ttl = t.seconds("idempotency_ttl", _MAX_IDEMPOTENCY_TTL)
    token = t.string("token", default="") or None
    if token is not None and (len(token) < 16 or not token.isprintable() or " " in token):
        t.problem("token", "must be at least 16 printable characters without spaces")
    allowed_hosts = t.strings("allowed_hosts", "host names", empty=True)
    for name in allowed_hosts:
        if name != "*" and not _HOSTNAME.fullmatch(name):
            t.problem("allowed_hosts", f"not a host name: {name!r}")
    keepalive_timeout = t.seconds("keepalive_timeout", _HOUR)
    request_read_timeout = t.seconds("request_read_timeout", _HOUR)
    max_connections = t.integer("max_connections", 1, _MAX_CONNECTIONS)
    signing_secrets = read_signing_secrets(t, env_secrets)
    try:
        host, port, unix_path = _parse_listen(listen)
    except ValueError as e:
        t.problem("listen", str(e))
        return ServerConfig()
    return ServerConfig(
        listen=listen,
        max_body=max_body,
        host=host,
        port=port,
        unix_path=unix_path,
        token=token,
        max_batch=max_batch,
        idempotency_ttl=idempotency_ttl,
        allowed_hosts=tuple(name.lower() for name in allowed_hosts),
        public_reads=t.boolean("public_reads"),
        public_health=t.boolean("public_health"),
        public_metrics=t.boolean("public_metrics"),
        keepalive_timeout=keepalive_timeout,
        request_read_timeout=request_read_timeout,
        max_connections=max_connections,
        signing_secrets=signing_secrets,
    )


def _parse_listen(listen: str) -> tuple[str | None, int | None, str | None]:
    """Split "host:port", "[v6]:port" or "unix:/path" into (host, port, unix_path)."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {listen!r}")
        return None, None, path
    bad = ValueError(f"expected host:port or unix:/path, got {listen!r}")
    host, _, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    elif not _HOSTNAME.fullmatch(host):
        raise bad  # also a bare IPv6 address, whose colons make the port ambiguous
    if not _PORT.fullmatch(port_text):
        raise bad
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be from 0 to 65535, got {listen!r}")
    return host, port, None


def read_redis(t: Table, env_url: str) -> RedisConfig:
    url = t.string("url")
    if "url" not in t.bad and (problem := redis_url_problem(url)):
        t.problem("url", problem)
    if env_url:
        url = env_url
        if problem := redis_url_problem(url):
            t.problem("url", problem, suffix=" (from TASKD_REDIS_URL)")
    prefix = t.string("prefix")
    if "prefix" not in t.bad and not _PREFIX.fullmatch(prefix):
        t.problem("prefix", f"must be 1-64 letters, digits, '_', '.' or '-', got {prefix!r}")
    data_dir = t.string("data_dir", default=str(t.default("data_dir")))
    if "data_dir" not in t.bad and not data_dir:
        t.problem("data_dir", "must not be empty")
    cluster = t.boolean("cluster")
    if cluster and (problem := cluster_url_problem(url)):
        t.problem("cluster", problem)
    request_timeout = t.seconds("request_timeout", _MAX_REDIS_TIMEOUT)
    if "request_timeout" not in t.bad and request_timeout <= 0:
        t.problem("request_timeout", f"must be more than 0 seconds, got {request_timeout:g}")
    embedded_listen = t.string("embedded_listen", default="") or None
    address = _embedded_address(t, embedded_listen) if embedded_listen is not None else None
    return RedisConfig(
        url=url,
        prefix=prefix,
        data_dir=Path(data_dir),
        cluster=cluster,
        request_timeout=request_timeout,
        embedded_listen=embedded_listen,
        embedded_address=address,
    )


def _embedded_address(t: Table, listen: str) -> tuple[str, int] | None:
    """embedded_listen as (address, port): an IP address, as redis-server binds one."""
    # The file's url, not TASKD_REDIS_URL's: a second daemon may share this file and name
    # the first one's Redis in the environment; it then starts none, and this is unused.
    if t.data.get("url", t.default("url")) != "embedded":
        t.problem("embedded_listen", 'only an embedded Redis (url = "embedded") is started here')
        return None
    try:
        host, port, _ = _parse_listen(listen)
        ipaddress.ip_address(host or "")  # a unix: path has no host, and fails here too
    except ValueError:
        rule = '"ADDRESS:PORT" with an IP address, e.g. "127.0.0.1:6390" or "[::1]:6390"'
        t.problem("embedded_listen", f"must be {rule}, got {listen!r}")
        return None
    if not port:
        # Other daemons must be told the port: one picked at random would not do.
        t.problem("embedded_listen", f"port must be from 1 to 65535, got {listen!r}")
        return None
    return host or "", port


def read_workers(t: Table, directory: Path) -> WorkersConfig:
    """The [workers] table; relative python_path entries are taken from `directory`."""
    concurrency = t.integer("concurrency", 1, _MAX_CONCURRENCY)
    queues = t.strings("queues", "queue names")
    if "queues" not in t.bad:
        _check_queue_names(t, queues)
    shutdown_timeout = t.seconds("shutdown_timeout")
    heartbeat = t.seconds("heartbeat_interval")
    dead_after = t.seconds("dead_after")
    # Fewer than two missed heartbeats would declare a merely slow daemon dead.
    if not t.bad & {"heartbeat_interval", "dead_after"} and dead_after < 2 * heartbeat:
        t.problem(
            "dead_after",
            f"must be at least 2 x {t.key('heartbeat_interval')} ({2 * heartbeat:g}), "
            f"got {dead_after:g}",
        )
    queue_mode = t.string("queue_mode")
    if "queue_mode" not in t.bad and queue_mode not in QUEUE_MODES:
        t.problem("queue_mode", f"must be one of {', '.join(QUEUE_MODES)}, got {queue_mode!r}")
    weights = _weights(t, queues, queue_mode) if "weights" in t.data else ()
    python_path = _python_path(t, directory)
    return WorkersConfig(
        concurrency=concurrency,
        queues=queues,
        shutdown_timeout=shutdown_timeout,
        heartbeat_interval=heartbeat,
        dead_after=dead_after,
        queue_mode=queue_mode,
        weights=weights,
        python_path=python_path,
    )


def _python_path(t: Table, directory: Path) -> tuple[Path, ...]:
    entries = t.strings("python_path", "directories", empty=True)
    found = []
    for i, entry in enumerate(entries):
        path = directory / entry  # an absolute entry stays as it is
        # A typo would otherwise show only as a module not found, far from its cause.
        if not path.is_dir():
            shown = f"{path} (from {entry!r})" if str(path) != entry else repr(entry)
            t.problem("python_path", f"no such directory: {shown}", suffix=f"[{i}]")
        found.append(path)
    return tuple(found)


def _check_queue_names(t: Table, queues: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for i, queue in enumerate(queues):
        if not QUEUE_NAME.fullmatch(queue):
            t.problem("queues", f"invalid queue name {queue!r}: use {QUEUE_RULE}", suffix=f"[{i}]")
        elif queue in seen:
            t.problem("queues", f"duplicate queue name {queue!r}", suffix=f"[{i}]")
        seen.add(queue)


def _weights(t: Table, queues: tuple[str, ...], queue_mode: str) -> tuple[tuple[str, int], ...]:
    if queue_mode == "strict":
        t.problem("weights", 'only queue_mode = "weighted" takes weights, not "strict"')
        return ()
    w = t.table("weights")  # every key is read here, so the table reports none as unknown
    weights = []
    for queue in w.data:
        weight = w.integer(queue, 1, _MAX_WEIGHT, default=1)
        # Against an invalid queues array every name would be reported: noise.
        if "queues" not in t.bad and queue not in queues:
            w.problem(queue, f"not a queue of {t.key('queues')} ({', '.join(queues)})")
        weights.append((queue, weight))
    return tuple(weights)


def read_retention(t: Table) -> RetentionConfig:
    completed = t.seconds("completed", most=_TEN_YEARS)
    failed = t.seconds("failed", most=_TEN_YEARS)
    return RetentionConfig(completed=completed, failed=failed)


def read_archive(t: Table, env_url: str) -> ArchiveConfig:
    url = t.string("url", default="") or None
    if url is not None and (problem := postgres_url_problem(url)):
        t.problem("url", problem)
    if env_url:
        url = env_url
        if problem := postgres_url_problem(url):
            t.problem("url", problem, suffix=" (from TASKD_ARCHIVE_URL)")
    elif t.data and url is None and "url" not in t.bad:
        t.problem("url", "is required: the PostgreSQL database to archive to")
    keep_days = t.integer("keep_days", 0, _MAX_KEEP_DAYS)
    if url is not None and importlib.util.find_spec("psycopg") is None:
        t.problem("url", "archiving needs the archive extra: pip install 'taskd[archive]'")
    return ArchiveConfig(url=url, keep_days=keep_days)


def read_callbacks(t: Table) -> CallbacksConfig:
    return CallbacksConfig(allow=_networks(t, "allow"), deny=_networks(t, "deny"))


def _networks(t: Table, name: str) -> tuple[Network, ...]:
    value = t.data.get(name, [])
    if not isinstance(value, list):
        t.problem(name, f"must be an array of networks ({_CIDR_RULE}), got {describe(value)}")
        return ()
    networks = []
    for i, item in enumerate(value):
        try:
            # ip_network() takes integers as addresses too: a TOML 10 is no network.
            if not isinstance(item, str):
                raise ValueError
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            t.problem(name, f"must be {_CIDR_RULE}, got {describe(item)}", suffix=f"[{i}]")
    return () if name in t.bad else tuple(networks)
