"""The configuration: frozen dataclasses loaded from TOML, validated at start."""

from __future__ import annotations

import importlib
import ipaddress
import json
import math
import os
import re
import shutil
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from taskd.jobs import PRIORITIES
from taskd.slots import QUEUE_MODES

# Names of the jobs the daemon can run without any code of yours.
BUILTINS = ("echo", "noop", "sleep", "fail")

# Queue names go into Redis keys and hash tags, so braces and colons are out.
QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HANDLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PYTHON_TARGET = re.compile(
    r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII
)
_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")
_DB_PATH = re.compile(r"/?|/[0-9]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The job's own variables (TASKD_JOB_ID and the like) and the daemon's (TASKD_REDIS_URL,
# with its password) share this prefix: a handler may neither fake the one nor leak the other.
_JOB_ENV_PREFIX = "TASKD_"
_ENV_RULE = "use letters, digits and '_', not starting with a digit"
# Everything between "scheme://" and the last "@": user names and passwords.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^@]*@")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_BODY = 1 << 30
_WEEK = 7 * 24 * 3600.0
# Longer than this, a retention is surely milliseconds written as seconds.
_TEN_YEARS = 10 * 365 * 24 * 3600.0
MAX_ATTEMPTS = 1000  # attempts a job may have at most (submissions are held to it too)
_TOP_KEYS = ("server", "redis", "workers", "retention", "callbacks", "handlers", "schedules")
_SCHEDULE_KEYS = (
    "name", "cron", "timezone", "type", "payload", "queue", "catch_up", "priority",
)  # fmt: skip
_CATCH_UP = ("none", "latest")
_SERVER_KEYS = (
    "listen", "max_body", "max_batch", "idempotency_ttl", "token", "allowed_hosts",
    "public_reads", "public_health", "public_metrics", "keepalive_timeout",
    "request_read_timeout", "max_connections",
)  # fmt: skip
# Longer than this, a connection timeout is surely milliseconds written as seconds.
_HOUR = 3600.0
# A file descriptor each: beyond about this, Linux's own default ceiling (nr_open) is hit.
_MAX_CONNECTIONS = 1_000_000
_REDIS_KEYS = ("url", "prefix", "data_dir", "cluster", "request_timeout")
_WORKERS_KEYS = (
    "concurrency", "queues", "shutdown_timeout", "heartbeat_interval", "dead_after",
    "queue_mode", "weights",
)  # fmt: skip
_MAX_WEIGHT = 1000
_RETENTION_KEYS = ("completed", "failed")
_CALLBACKS_KEYS = ("allow", "deny")
_CIDR_RULE = 'a network like "10.0.0.0/8" or an address like "10.1.2.3"'
_MAX_REDIRECTS = 10
DEFAULT_MAX_REDIRECTS = 3
_KINDS = ("builtin", "python", "exec", "http")
_HANDLER_KEYS = (
    *_KINDS,
    "queue",
    "timeout",
    "concurrency",
    "max_attempts",
    "backoff_base",
    "backoff_max",
    "permanent_exit_codes",
    "rate_limit",
    "global_concurrency",
    "env",
    "pass_env",
    "max_redirects",
)
# A rate limit's unit: how many milliseconds its window spans.
_RATE_UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000}
_RATE_LIMIT = re.compile(r"([0-9]+)/([smh])")
_MAX_RATE_COUNT = 1_000_000
_RATE_RULE = 'must be "COUNT/s", "COUNT/m" or "COUNT/h" (e.g. "100/s")'
_NO_HANDLERS = 'at least one handler is required, e.g. [handlers.echo] builtin = "echo"'
_QUEUE_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
_HANDLER_RULE = "1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"


class ConfigError(Exception):
    """A config file that cannot be used; carries every problem found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        # Both go to Exception so the error survives pickling (e.g. across processes).
        super().__init__(source, problems)
        self.source = source
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {problem}" for problem in self.problems)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP API: where it listens and how large a request it takes."""

    listen: str = "127.0.0.1:7700"
    max_body: int = 1_048_576
    host: str | None = "127.0.0.1"
    port: int | None = 7700
    unix_path: str | None = None
    # When set, every endpoint needs it (as Authorization: Bearer), except the dashboard's
    # page and files, and what the three settings below leave open.
    token: str | None = None
    max_batch: int = 10_000  # most jobs in one POST /jobs/batch
    idempotency_ttl: float = 86_400.0  # seconds an idempotency key keeps answering its job
    # Host names requests may name besides IP addresses and localhost ("*": any), so that
    # a page whose name was rebound to this address cannot talk to the API.
    allowed_hosts: tuple[str, ...] = ()
    public_reads: bool = False  # with a token: reads (jobs, stats, the dashboard's) need none
    public_health: bool = True  # with a token: /health needs none (probes have no secret)
    public_metrics: bool = True  # with a token: /metrics needs none (nor do scrapers)
    # Every connection holds a file descriptor, which idle or slow clients must not use up
    # (see taskd.connections): seconds an idle keep-alive connection stays open; seconds a
    # client has to send a whole request head (from connecting, or from the first byte of
    # a later request), which is also the longest a body may pause; connections open at
    # most, every listening address together.
    keepalive_timeout: float = 75.0
    request_read_timeout: float = 10.0
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Which Redis holds the queues, and the prefix of every key taskd writes."""

    url: str = "embedded"
    prefix: str = "taskd"
    data_dir: Path = Path("var")
    # The url names one node of a Redis Cluster; taskd finds the others from it.
    cluster: bool = False
    # Seconds an HTTP request may wait for Redis before it answers 503: a client is better
    # told at once than left hanging through an outage.
    request_timeout: float = 2.0

    @property
    def embedded(self) -> bool:
        """Whether taskd starts its own private redis-server."""
        return self.url == "embedded"


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """How many jobs this daemon runs, from which queues, and its liveness timing."""

    concurrency: int = 100
    queues: tuple[str, ...] = ("default",)
    shutdown_timeout: float = 30.0
    heartbeat_interval: float = 5.0
    dead_after: float = 30.0
    # Which queue gets a free slot: "strict" (in the order of `queues`) or "weighted".
    queue_mode: str = "weighted"
    # Weighted mode: (queue, weight) pairs as given; a queue not listed weighs 1.
    weights: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `count` jobs of a type start in any `per_ms` milliseconds, across all daemons."""

    count: int
    per_ms: int

    def __str__(self) -> str:
        for unit, span in _RATE_UNITS.items():
            if span == self.per_ms:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.per_ms}ms"


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    """How jobs of one type are run; exactly one of builtin, python, exec, http is set."""

    name: str
    kind: str
    builtin: str | None = None
    python: str | None = None
    exec: tuple[str, ...] | None = None
    http: str | None = None
    queue: str = "default"
    timeout: float = 1800.0
    concurrency: int | None = None
    max_attempts: int = 3
    backoff_base: float = 2.0
    backoff_max: float = 3600.0
    permanent_exit_codes: tuple[int, ...] = ()
    rate_limit: RateLimit | None = None  # e.g. 100/s: job starts of this type, all daemons
    # Jobs of this type running at once across all daemons sharing the Redis; `concurrency`
    # limits one daemon only.
    global_concurrency: int | None = None
    # exec only: (name, value) pairs set in the program's environment, as given.
    env: tuple[tuple[str, str], ...] = ()
    # exec only: names copied from the daemon's environment, where set there.
    pass_env: tuple[str, ...] = ()
    # http only: redirects followed, each destination checked as the first one is.
    max_redirects: int = DEFAULT_MAX_REDIRECTS


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long finished jobs stay in Redis before they are deleted."""

    completed: float = 86400.0
    failed: float = 604800.0


@dataclass(frozen=True, slots=True)
class CallbacksConfig:
    """Where callbacks and http handlers may connect, besides public addresses (see
    taskd.egress): networks permitted though private, and networks refused though public."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    """A recurring job: one job of `type` at every tick of `cron`, across all daemons."""

    name: str
    cron: str  # five fields, or @hourly, @daily, @weekly, @monthly, @yearly
    timezone: str = "UTC"  # an IANA zone, e.g. "Europe/Paris"
    type: str = ""
    payload: Any = None
    queue: str | None = None  # default: the handler's queue
    catch_up: str = "none"  # a tick missed while every daemon was down: "none" or "latest"
    priority: int | None = None  # 0 to 9; default: the job default (jobs.DEFAULT_PRIORITY)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one daemon."""

    server: ServerConfig
    redis: RedisConfig
    workers: WorkersConfig
    handlers: Mapping[str, HandlerConfig]
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    schedules: tuple[ScheduleConfig, ...] = ()
    source: str = "<config>"
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file; raise ConfigError listing every problem."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, [f"cannot read file: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not valid UTF-8: {e}"]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"invalid TOML: {e}"]) from e
    return parse(data, source=source, env=env)


def parse(
    data: Mapping[str, Any], *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate already-parsed TOML data; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    root = _Table(data, "", _TOP_KEYS, problems)
    server = _server(root.table("server", _SERVER_KEYS))
    redis = _redis(root.table("redis", _REDIS_KEYS), env.get("TASKD_REDIS_URL", ""))
    workers = _workers(root.table("workers", _WORKERS_KEYS))
    retention = _retention(root.table("retention", _RETENTION_KEYS))
    callbacks = _callbacks(root.table("callbacks", _CALLBACKS_KEYS))
    handlers = _handlers(root, problems)
    schedules = _schedules(root, handlers, problems)
    if problems:
        raise ConfigError(source, problems)
    handler_map = types.MappingProxyType(handlers)
    return Config(
        server, redis, workers, handler_map, retention, schedules, source, callbacks=callbacks
    )


class _Table:
    """One TOML table being read: typed getters that note problems under key paths."""

    def __init__(
        self, data: Mapping[str, Any], path: str, known: tuple[str, ...], problems: list[str]
    ) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.bad: set[str] = set()  # keys already reported, so checks across keys skip them
        for key in data:
            if key not in known:
                problems.append(f"{self.key(key)}: unknown key (known: {', '.join(known)})")

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def problem(self, name: str, text: str, *, suffix: str = "") -> None:
        self.bad.add(name)
        self.problems.append(f"{self.key(name)}{suffix}: {text}")

    def table(self, name: str, known: tuple[str, ...]) -> _Table:
        value = self.data.get(name, {})
        if not isinstance(value, Mapping):
            self.problem(name, f"must be a table, got {_describe(value)}")
            value = {}
        return _Table(value, self.key(name), known, self.problems)

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, f"must be an integer, got {_describe(value)}")
            return default
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            self.problem(name, f"must be an integer {span}, got {value}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false, got {_describe(value)}")
            return default
        return value

    def seconds(self, name: str, default: float, most: float | None = None) -> float:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(name, f"must be a number of seconds, got {_describe(value)}")
            return default
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not (math.isfinite(seconds) and seconds > 0 and (most is None or seconds <= most)):
            span = "greater than 0" + (f" and at most {most:.15g}" if most is not None else "")
            self.problem(name, f"must be a number of seconds {span}, got {value}")
            return default
        return seconds

    def string(self, name: str, default: str) -> str:
        value = self.data.get(name, default)
        if not isinstance(value, str):
            self.problem(name, f"must be a string, got {_describe(value)}")
            return default
        return value

    def strings(
        self, name: str, default: tuple[str, ...], what: str, *, empty: bool = False
    ) -> tuple[str, ...]:
        value = self.data.get(name, default)
        if not isinstance(value, list | tuple) or (not value and not empty):
            rule = "an array" if empty else "a non-empty array"
            self.problem(name, f"must be {rule} of {what}, got {_describe(value)}")
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.problem(
                    name, f"must be a non-empty string, got {_describe(item)}", suffix=f"[{i}]"
                )
        return default if name in self.bad else tuple(value)

    def integers(self, name: str, low: int, high: int, what: str) -> tuple[int, ...]:
        value = self.data.get(name, ())
        if not isinstance(value, list | tuple):
            self.problem(name, f"must be an array of {what}, got {_describe(value)}")
            return ()
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                text = f"must be an integer, got {_describe(item)}"
            elif not low <= item <= high:
                text = f"must be an integer from {low} to {high}, got {item}"
            else:
                continue
            self.problem(name, text, suffix=f"[{i}]")
        return () if name in self.bad else tuple(value)


def _server(t: _Table) -> ServerConfig:
    default = ServerConfig()
    listen = t.string("listen", default.listen)
    max_body = t.integer("max_body", default.max_body, 1, _MAX_BODY)
    max_batch = t.integer("max_batch", default.max_batch, 1, 100_000)
    idempotency_ttl = t.seconds("idempotency_ttl", default.idempotency_ttl, 30 * 86_400.0)
    token = t.string("token", "") or None
    if token is not None and (len(token) < 16 or not token.isprintable() or " " in token):
        t.problem("token", "must be at least 16 printable characters without spaces")
    allowed_hosts = t.strings("allowed_hosts", default.allowed_hosts, "host names", empty=True)
    for name in allowed_hosts:
        if name != "*" and not _HOSTNAME.fullmatch(name):
            t.problem("allowed_hosts", f"not a host name: {name!r}")
    keepalive_timeout = t.seconds("keepalive_timeout", default.keepalive_timeout, _HOUR)
    request_read_timeout = t.seconds("request_read_timeout", default.request_read_timeout, _HOUR)
    max_connections = t.integer("max_connections", default.max_connections, 1, _MAX_CONNECTIONS)
    try:
        host, port, unix_path = _parse_listen(listen)
    except ValueError as e:
        t.problem("listen", str(e))
        return default
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
        public_reads=t.boolean("public_reads", default.public_reads),
        public_health=t.boolean("public_health", default.public_health),
        public_metrics=t.boolean("public_metrics", default.public_metrics),
        keepalive_timeout=keepalive_timeout,
        request_read_timeout=request_read_timeout,
        max_connections=max_connections,
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


def _redis(t: _Table, env_url: str) -> RedisConfig:
    default = RedisConfig()
    url = t.string("url", default.url)
    if "url" not in t.bad and (problem := _redis_url_problem(url)):
        t.problem("url", problem)
    if env_url:
        url = env_url
        if problem := _redis_url_problem(url):
            t.problem("url", problem, suffix=" (from TASKD_REDIS_URL)")
    prefix = t.string("prefix", default.prefix)
    if "prefix" not in t.bad and not _PREFIX.fullmatch(prefix):
        t.problem("prefix", f"must be 1-64 letters, digits, '_', '.' or '-', got {prefix!r}")
    data_dir = t.string("data_dir", str(default.data_dir))
    if "data_dir" not in t.bad and not data_dir:
        t.problem("data_dir", "must not be empty")
    cluster = t.boolean("cluster", False)
    if cluster and (problem := _cluster_url_problem(url)):
        t.problem("cluster", problem)
    request_timeout = t.seconds("request_timeout", default.request_timeout, 60.0)
    if "request_timeout" not in t.bad and request_timeout <= 0:
        t.problem("request_timeout", f"must be more than 0 seconds, got {request_timeout:g}")
    return RedisConfig(url, prefix, Path(data_dir), cluster, request_timeout)


def _cluster_url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        shown = _redact(url)
        return f"a Redis Cluster needs the redis:// or rediss:// url of a node, got {shown!r}"
    if parts.path.strip("/") not in ("", "0"):
        return f"a Redis Cluster has only database 0, got {_redact(url)!r}"
    return None


def _redis_url_problem(url: str) -> str | None:
    if url == "embedded":
        return None
    shown = _redact(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        return f"invalid URL {shown!r}: {e}"
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            return f"a {parts.scheme}:// URL needs a host, got {shown!r}"
        if not _DB_PATH.fullmatch(parts.path):
            return f"the database must be a number, as in redis://host:6379/0, got {shown!r}"
        return None
    if parts.scheme == "unix":
        if not parts.path:
            return f"a unix:// URL needs a socket path, as in unix:///run/redis.sock, got {shown!r}"
        return None
    return f'must be "embedded" or a redis://, rediss:// or unix:// URL, got {shown!r}'


def _workers(t: _Table) -> WorkersConfig:
    default = WorkersConfig()
    concurrency = t.integer("concurrency", default.concurrency, 1, 100_000)
    queues = t.strings("queues", default.queues, "queue names")
    if "queues" not in t.bad:
        _check_queue_names(t, queues)
    shutdown_timeout = t.seconds("shutdown_timeout", default.shutdown_timeout)
    heartbeat = t.seconds("heartbeat_interval", default.heartbeat_interval)
    dead_after = t.seconds("dead_after", default.dead_after)
    # Fewer than two missed heartbeats would declare a merely slow daemon dead.
    if not t.bad & {"heartbeat_interval", "dead_after"} and dead_after < 2 * heartbeat:
        t.problem(
            "dead_after",
            f"must be at least 2 x {t.key('heartbeat_interval')} ({2 * heartbeat:g}), "
            f"got {dead_after:g}",
        )
    queue_mode = t.string("queue_mode", default.queue_mode)
    if "queue_mode" not in t.bad and queue_mode not in QUEUE_MODES:
        t.problem("queue_mode", f"must be one of {', '.join(QUEUE_MODES)}, got {queue_mode!r}")
    weights = _weights(t, queues, queue_mode) if "weights" in t.data else ()
    return WorkersConfig(
        concurrency, queues, shutdown_timeout, heartbeat, dead_after, queue_mode, weights
    )


def _weights(t: _Table, queues: tuple[str, ...], queue_mode: str) -> tuple[tuple[str, int], ...]:
    if queue_mode == "strict":
        t.problem("weights", 'only queue_mode = "weighted" takes weights, not "strict"')
        return ()
    raw = t.data["weights"]
    # Every key is read here, so the table reports none as unknown.
    w = t.table("weights", tuple(raw) if isinstance(raw, Mapping) else ())
    weights = []
    for queue in w.data:
        weight = w.integer(queue, 1, 1, _MAX_WEIGHT)
        # Against an invalid queues array every name would be reported: noise.
        if "queues" not in t.bad and queue not in queues:
            w.problem(queue, f"not a queue of {t.key('queues')} ({', '.join(queues)})")
        weights.append((queue, weight))
    return tuple(weights)


def _retention(t: _Table) -> RetentionConfig:
    default = RetentionConfig()
    completed = t.seconds("completed", default.completed, most=_TEN_YEARS)
    failed = t.seconds("failed", default.failed, most=_TEN_YEARS)
    return RetentionConfig(completed, failed)


def _callbacks(t: _Table) -> CallbacksConfig:
    return CallbacksConfig(_networks(t, "allow"), _networks(t, "deny"))


def _networks(t: _Table, name: str) -> tuple[Network, ...]:
    value = t.data.get(name, [])
    if not isinstance(value, list):
        t.problem(name, f"must be an array of networks ({_CIDR_RULE}), got {_describe(value)}")
        return ()
    networks = []
    for i, item in enumerate(value):
        try:
            # ip_network() takes integers as addresses too: a TOML 10 is no network.
            if not isinstance(item, str):
                raise ValueError
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            t.problem(name, f"must be {_CIDR_RULE}, got {_describe(item)}", suffix=f"[{i}]")
    return () if name in t.bad else tuple(networks)


def _check_queue_names(t: _Table, queues: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for i, queue in enumerate(queues):
        if not QUEUE_NAME.fullmatch(queue):
            t.problem("queues", f"invalid queue name {queue!r}: use {_QUEUE_RULE}", suffix=f"[{i}]")
        elif queue in seen:
            t.problem("queues", f"duplicate queue name {queue!r}", suffix=f"[{i}]")
        seen.add(queue)


def _handlers(root: _Table, problems: list[str]) -> dict[str, HandlerConfig]:
    raw = root.data.get("handlers", {})
    if not isinstance(raw, Mapping):
        root.problem("handlers", f"must be a table, got {_describe(raw)}")
        return {}
    if not raw:
        root.problem("handlers", _NO_HANDLERS)
    handlers: dict[str, HandlerConfig] = {}
    for name, spec in raw.items():
        path = _join("handlers", name)
        if not _HANDLER_NAME.fullmatch(name):
            problems.append(f"{path}: invalid handler name: use {_HANDLER_RULE}")
        if not isinstance(spec, Mapping):
            problems.append(f"{path}: must be a table, got {_describe(spec)}")
            continue
        handlers[name] = _handler(name, _Table(spec, path, _HANDLER_KEYS, problems))
    return handlers


def _schedules(
    root: _Table, handlers: Mapping[str, HandlerConfig], problems: list[str]
) -> tuple[ScheduleConfig, ...]:
    raw = root.data.get("schedules", [])
    if not isinstance(raw, list):
        root.problem(
            "schedules", f"must be an array of tables ([[schedules]]), got {_describe(raw)}"
        )
        return ()
    schedules: list[ScheduleConfig] = []
    for index, spec in enumerate(raw):
        path = f"schedules[{index}]"
        if not isinstance(spec, Mapping):
            problems.append(f"{path}: must be a table, got {_describe(spec)}")
            continue
        schedule = _schedule(_Table(spec, path, _SCHEDULE_KEYS, problems), handlers)
        if any(s.name == schedule.name for s in schedules):
            problems.append(f"{path}.name: another schedule is named {schedule.name!r}")
        schedules.append(schedule)
    return tuple(schedules)


def _schedule(t: _Table, handlers: Mapping[str, HandlerConfig]) -> ScheduleConfig:
    name = t.string("name", "")
    if not _HANDLER_NAME.fullmatch(name):
        t.problem("name", f"required, {_HANDLER_RULE}")
    cron = t.string("cron", "")
    if not croniter.is_valid(cron):
        t.problem("cron", f"not a cron expression (five fields or @hourly and the like): {cron!r}")
    zone = t.string("timezone", "UTC")
    try:
        ZoneInfo(zone)
    except (ValueError, ZoneInfoNotFoundError):
        t.problem("timezone", f"unknown time zone {zone!r} (use an IANA name like Europe/Paris)")
    job_type = t.string("type", "")
    if job_type not in handlers:
        t.problem("type", f"must name a configured handler, got {job_type!r}")
    queue = t.data.get("queue")
    if queue is not None and (not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue)):
        t.problem("queue", f"must be a queue name: {_QUEUE_RULE}")
    catch_up = t.string("catch_up", "none")
    if catch_up not in _CATCH_UP:
        t.problem("catch_up", f"must be one of {', '.join(_CATCH_UP)}, got {catch_up!r}")
    payload = t.data.get("payload")
    priority = (
        t.integer("priority", 0, PRIORITIES[0], PRIORITIES[-1]) if "priority" in t.data else None
    )
    return ScheduleConfig(name, cron, zone, job_type, payload, queue, catch_up, priority)


def _handler(name: str, t: _Table) -> HandlerConfig:
    given = [kind for kind in _KINDS if kind in t.data]
    if len(given) != 1:
        got = " and ".join(given) or "none"
        t.problems.append(f"{t.path}: give exactly one of {', '.join(_KINDS)} (got {got})")
    builtin = _builtin(t) if "builtin" in t.data else None
    python = _python(t) if "python" in t.data else None
    env = _env(t, given)
    argv = _exec(t, dict(env).get("PATH")) if "exec" in t.data else None
    http = _http(t) if "http" in t.data else None
    queue = t.string("queue", "default")
    if "queue" not in t.bad and not QUEUE_NAME.fullmatch(queue):
        t.problem("queue", f"invalid queue name {queue!r}: use {_QUEUE_RULE}")
    timeout = t.seconds("timeout", 1800.0, most=_WEEK)
    concurrency = t.integer("concurrency", 0, 1) if "concurrency" in t.data else None
    max_attempts = t.integer("max_attempts", 3, 1, MAX_ATTEMPTS)
    backoff_base, backoff_max = _backoff(t)
    exit_codes = _exit_codes(t, given)
    pass_env = _pass_env(t, given)
    rate_limit = _rate_limit(t) if "rate_limit" in t.data else None
    global_concurrency = (
        t.integer("global_concurrency", 0, 1, 100_000) if "global_concurrency" in t.data else None
    )
    max_redirects = _max_redirects(t, given)
    kind = given[0] if len(given) == 1 else ""
    return HandlerConfig(
        name,
        kind,
        builtin,
        python,
        argv,
        http,
        queue,
        timeout,
        concurrency,
        max_attempts,
        backoff_base,
        backoff_max,
        exit_codes,
        rate_limit,
        global_concurrency,
        env,
        pass_env,
        max_redirects,
    )


def _backoff(t: _Table) -> tuple[float, float]:
    base = t.seconds("backoff_base", 2.0)
    most = t.seconds("backoff_max", 3600.0, most=_WEEK)
    # A cap below the first wait would silently override backoff_base: a contradiction.
    if not t.bad & {"backoff_base", "backoff_max"} and most < base:
        t.problem(
            "backoff_max",
            f"must be at least {t.key('backoff_base')} ({base:g}), got {most:g}",
        )
    return base, most


def _max_redirects(t: _Table, kinds: list[str]) -> int:
    if "max_redirects" not in t.data:
        return DEFAULT_MAX_REDIRECTS
    # With no kind given, "give exactly one of ..." is the problem; this would be noise.
    if kinds and "http" not in kinds:
        t.problem("max_redirects", "only http handlers follow redirects")
        return DEFAULT_MAX_REDIRECTS
    return t.integer("max_redirects", DEFAULT_MAX_REDIRECTS, 0, _MAX_REDIRECTS)


def _rate_limit(t: _Table) -> RateLimit | None:
    value = t.data["rate_limit"]
    shown = _describe(value).removeprefix("string ")  # a string shows quoted, as in the file
    match = _RATE_LIMIT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        t.problem("rate_limit", f"{_RATE_RULE}, got {shown}")
        return None
    digits = match[1].lstrip("0")
    # Compared as text first: int() of thousands of digits raises.
    if len(digits) > len(str(_MAX_RATE_COUNT)) or not 1 <= int(digits or "0") <= _MAX_RATE_COUNT:
        t.problem("rate_limit", f"COUNT must be from 1 to {_MAX_RATE_COUNT}, got {shown}")
        return None
    return RateLimit(int(digits), _RATE_UNITS[match[2]])


def _exit_codes(t: _Table, kinds: list[str]) -> tuple[int, ...]:
    if "permanent_exit_codes" not in t.data:
        return ()
    # With no kind given, "give exactly one of ..." is the problem; this would be noise.
    if kinds and "exec" not in kinds:
        t.problem("permanent_exit_codes", "only exec handlers have exit codes")
        return ()
    codes = t.integers("permanent_exit_codes", 1, 255, "exit codes")
    seen: set[int] = set()
    for i, code in enumerate(codes):
        if code in seen:
            t.problem("permanent_exit_codes", f"duplicate exit code {code}", suffix=f"[{i}]")
        seen.add(code)
    return () if "permanent_exit_codes" in t.bad else codes


def _exec_only(t: _Table, name: str, kinds: list[str]) -> bool:
    """Whether key `name` is given and may be read: its handler runs a program."""
    if name not in t.data:
        return False
    # With no kind given, "give exactly one of ..." is the problem; this would be noise.
    if kinds and "exec" not in kinds:
        t.problem(name, "only exec handlers run a program with an environment")
        return False
    return True


def _env(t: _Table, kinds: list[str]) -> tuple[tuple[str, str], ...]:
    if not _exec_only(t, "env", kinds):
        return ()
    raw = t.data["env"]
    # Every key is read here, so the table reports none as unknown.
    e = t.table("env", tuple(raw) if isinstance(raw, Mapping) else ())
    pairs = []
    for name, value in e.data.items():
        if problem := _env_name_problem(name):
            e.problem(name, problem)
        elif not isinstance(value, str):
            e.problem(name, f"must be a string, got {_describe(value)}")
        elif "\0" in value:
            # The value is not shown: it may well be a secret.
            e.problem(name, "must not contain a NUL byte")
        else:
            pairs.append((name, value))
    return tuple(pairs)


def _pass_env(t: _Table, kinds: list[str]) -> tuple[str, ...]:
    if not _exec_only(t, "pass_env", kinds):
        return ()
    names = t.data["pass_env"]
    if not isinstance(names, list | tuple):
        t.problem("pass_env", f"must be an array of variable names, got {_describe(names)}")
        return ()
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str):
            t.problem("pass_env", f"must be a string, got {_describe(name)}", suffix=f"[{i}]")
            continue
        problem = _env_name_problem(name)
        if problem is None and name in seen:
            problem = f"duplicate name {name!r}"
        if problem is not None:
            t.problem("pass_env", problem, suffix=f"[{i}]")
        seen.add(name)
    return () if "pass_env" in t.bad else tuple(names)


def _env_name_problem(name: str) -> str | None:
    if not _ENV_NAME.fullmatch(name):
        return f"invalid environment variable name {name!r}: {_ENV_RULE}"
    if name.startswith(_JOB_ENV_PREFIX):
        return (
            f"reserved name {name!r}: {_JOB_ENV_PREFIX}* names are taskd's (the job's "
            "variables cannot be overridden, the daemon's are not passed on)"
        )
    return None


def _builtin(t: _Table) -> str:
    builtin = t.string("builtin", "")
    if "builtin" not in t.bad and builtin not in BUILTINS:
        t.problem("builtin", f"unknown builtin {builtin!r} (known: {', '.join(BUILTINS)})")
    return builtin


def _python(t: _Table) -> str:
    target = t.string("python", "")
    if "python" in t.bad:
        return target
    if not _PYTHON_TARGET.fullmatch(target):
        t.problem("python", f"must look like 'package.module:function', got {target!r}")
        return target
    module_name, _, qualname = target.partition(":")
    # Importing now turns a typo into a refusal to start, not a failure per job.
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        t.problem("python", f"cannot import module {module_name!r}: {e}")
    except Exception as e:
        t.problem("python", f"cannot import module {module_name!r}: {type(e).__name__}: {e}")
    else:
        found: Any = module
        for attr in qualname.split("."):  # "module:Class.method" names a method
            found = getattr(found, attr, None)
        if not callable(found):
            t.problem("python", f"module {module_name!r} has no callable {qualname!r}")
    return target


def _exec(t: _Table, env_path: str | None) -> tuple[str, ...]:
    """The argv; a bare program name is looked up on the PATH the program will get."""
    argv = t.strings("exec", (), "strings (the program and its arguments)")
    if "exec" in t.bad:
        return argv
    program = argv[0]
    if os.path.isabs(program):
        found = os.path.isfile(program) and os.access(program, os.X_OK)
    elif "/" in program or os.sep in program:
        # A relative path would depend on the working directory of whoever starts taskd.
        t.problem("exec", f"program must be an absolute path or a name on PATH, got {program!r}")
        return argv
    else:
        # A handler's env.PATH is where the program will be looked up, not the daemon's.
        found = shutil.which(program, path=env_path) is not None
        if not found and env_path is not None:
            t.problem("exec", f"program {program!r} not found on {t.key('env')}.PATH")
            return argv
    if not found:
        t.problem("exec", f"program {program!r} not found or not executable")
    return argv


def _http(t: _Table) -> str:
    url = t.string("http", "")
    if "http" in t.bad:
        return url
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        t.problem("http", f"must be an http:// or https:// URL with a host, got {_redact(url)!r}")
    return url


def _join(path: str, key: str) -> str:
    """A key path as TOML would spell it, quoting keys that are not bare."""
    key = str(key)
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _describe(value: Any) -> str:
    """A value as a TOML user knows it, for "got ..." in messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{'integer' if isinstance(value, int) else 'float'} {value}"
    if isinstance(value, str):
        shown = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
        return f"string {shown}"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, datetime | date | time):
        return f"datetime {value.isoformat()}"
    return type(value).__name__


def _redact(url: str) -> str:
    # Error messages end up in logs; passwords in URLs must not.
    return _USERINFO.sub(r"\1***@", url)
