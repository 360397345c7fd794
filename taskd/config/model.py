"""The configuration's schema: frozen dataclasses whose fields are its TOML keys and defaults."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

# Names of the jobs the daemon can run without any code of yours.
BUILTINS = ("echo", "noop", "sleep", "fail")
# How a daemon's queues share its slots (see taskd.slots.SlotArbiter).
QUEUE_MODES = ("strict", "weighted")
# A handler's kinds: the keys of which it gives exactly one.
KINDS = ("builtin", "python", "exec", "http")
# Queue names go into Redis keys and hash tags, so braces and colons are out.
QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
QUEUE_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
MAX_ATTEMPTS = 1000  # attempts a job may have at most (submissions are held to it too)
DEFAULT_MAX_REDIRECTS = 3
# A rate limit's unit: how many milliseconds its window spans.
RATE_UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Field metadata: the field is derived or given by the loader, not read from a TOML key.
_NOT_A_KEY: Mapping[str, Any] = {"key": None}


def toml_key(f: Field[Any]) -> str | None:
    """The TOML key a dataclass field is read from (its name unless metadata says otherwise)."""
    key: str | None = f.metadata.get("key", f.name)
    return key


def keys_of(schema: type[Any]) -> tuple[str, ...]:
    """The TOML keys of a section's dataclass, in field order."""
    return tuple(key for f in fields(schema) if (key := toml_key(f)) is not None)


def defaults_of(schema: type[Any]) -> dict[str, Any]:
    """The default of each TOML key of a section's dataclass that has one."""
    defaults: dict[str, Any] = {}
    for f in fields(schema):
        key = toml_key(f)
        if key is None:
            continue
        if f.default is not MISSING:
            defaults[key] = f.default
        elif f.default_factory is not MISSING:
            defaults[key] = f.default_factory()
    return defaults


@dataclass(frozen=True, slots=True)
class SigningSecret:
    """A key callbacks and http handler requests are signed with: a "whsec_" secret,
    decoded. Its repr hides it, so that no config printed or logged shows it."""

    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP API: where it listens and how large a request it takes."""

    listen: str = "127.0.0.1:7700"
    max_body: int = 1_048_576
    # Where `listen` points: a host and port, or a unix socket's path.
    host: str | None = field(default="127.0.0.1", metadata=_NOT_A_KEY)
    port: int | None = field(default=7700, metadata=_NOT_A_KEY)
    unix_path: str | None = field(default=None, metadata=_NOT_A_KEY)
    max_batch: int = 10_000  # most jobs in one POST /jobs/batch
    idempotency_ttl: float = 86_400.0  # seconds an idempotency key keeps answering its job
    # When set, every endpoint needs it (as Authorization: Bearer), except the dashboard's
    # page and files, and what the three settings below leave open.
    token: str | None = None
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
    # Keys that sign every callback and http handler request (Standard Webhooks), each of
    # them: more than one while a new key replaces an old. TASKD_SIGNING_SECRETS, when set,
    # replaces them (see taskd.config.secrets). None: nothing is signed.
    signing_secrets: tuple[SigningSecret, ...] = ()


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
    # "address:port" where the embedded Redis listens on TCP too (with a password), so that
    # other daemons can share it; none: only its unix socket, which only this user can open.
    embedded_listen: str | None = None
    # embedded_listen as (address, port).
    embedded_address: tuple[str, int] | None = field(default=None, metadata=_NOT_A_KEY)

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
    # Directories python handlers are imported from, after the config file's own and before
    # the packages of taskd's Python; absolute, relative ones taken from the config's.
    # Not a key of [handlers], whose keys are job types: a type may well be named "path".
    python_path: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `count` jobs of a type start in any `per_ms` milliseconds, across all daemons."""

    count: int
    per_ms: int

    def __str__(self) -> str:
        for unit, span in RATE_UNITS.items():
            if span == self.per_ms:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.per_ms}ms"


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    """How jobs of one type are run; exactly one of builtin, python, exec, http is set."""

    name: str = field(metadata=_NOT_A_KEY)  # the job type: the handler's table name
    kind: str = field(metadata=_NOT_A_KEY)  # which of the four keys below is given
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
class ArchiveConfig:
    """Where finished jobs are archived, a PostgreSQL database (see taskd.archiver), and
    for how long. Without a url nothing is archived."""

    url: str | None = None  # postgresql://…; TASKD_ARCHIVE_URL overrides it
    keep_days: int = 30  # archived jobs older than this are dropped (0: kept for ever)


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    """Sizing the fleet on its queues' depth (docs/operations.md#autoscaling): every
    daemon's /stats hint reads target_drain_s, min_daemons and max_daemons; the
    `taskd autoscale` controller, which starts and stops instances on that hint, the rest."""

    target_drain_s: float = 60.0  # the backlog should be gone within this many seconds
    min_daemons: int = 1
    max_daemons: int = 10
    # Scale down only to a count each daemon of which stays at most 1 - hysteresis busy.
    hysteresis: float = 0.2
    cooldown_up_s: float = 30.0  # after any change, before adding instances
    cooldown_down_s: float = 300.0  # the hint must stay lower this long before removing
    poll_interval_s: float = 10.0
    # The daemon whose /stats the controller reads; none: this file's [server] listen.
    url: str | None = None
    # {n} stands for the instance number, 1 to max_daemons.
    start_command: tuple[str, ...] = ("systemctl", "start", "taskd@{n}")
    stop_command: tuple[str, ...] = ("systemctl", "stop", "taskd@{n}")
    command_timeout_s: float = 120.0
    # Which instances the controller runs, kept across its restarts.
    state_file: Path = Path("autoscale.json")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Tracing with OpenTelemetry (see taskd.tracing): a span per submission and per
    attempt, sent over OTLP/HTTP. On with a [tracing] table; the standard OTEL_*
    variables override its keys (see taskd.config.tracing)."""

    # The collector's OTLP/HTTP base URL, e.g. "http://jaeger:4318"; /v1/traces is added.
    otlp_endpoint: str | None = None
    service_name: str = "taskd"
    # Of new traces, the share recorded (0 to 1); a job whose submitter sent a trace
    # context is recorded as the submitter's trace is (parent-based).
    sample_ratio: float = 1.0
    # Where spans go, the whole URL: None while tracing is off.
    traces_url: str | None = field(default=None, metadata=_NOT_A_KEY)
    # Which sampler (OTEL_TRACES_SAMPLER's names); sample_ratio is its ratio.
    sampler: str = field(default="parentbased_traceidratio", metadata=_NOT_A_KEY)

    @property
    def on(self) -> bool:
        return self.traces_url is not None


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
    source: str = field(default="<config>", metadata=_NOT_A_KEY)  # the file, for messages
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
