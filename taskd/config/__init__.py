"""The configuration: frozen dataclasses loaded from TOML, validated at start."""

from taskd.config.handlers import HANDLER_NAME
from taskd.config.loader import load, parse
from taskd.config.model import (
    BUILTINS,
    MAX_ATTEMPTS,
    QUEUE_MODES,
    QUEUE_NAME,
    ArchiveConfig,
    AutoscaleConfig,
    CallbacksConfig,
    Config,
    HandlerConfig,
    Network,
    RateLimit,
    RedisConfig,
    RetentionConfig,
    ScheduleConfig,
    ServerConfig,
    SigningSecret,
    TracingConfig,
    WorkersConfig,
)
from taskd.config.tables import ConfigError
from taskd.config.targets import NoCallable, TargetError, resolve
from taskd.config.urls import redact, redact_postgres

__all__ = [
    "BUILTINS",
    "HANDLER_NAME",
    "MAX_ATTEMPTS",
    "QUEUE_MODES",
    "QUEUE_NAME",
    "ArchiveConfig",
    "AutoscaleConfig",
    "CallbacksConfig",
    "Config",
    "ConfigError",
    "HandlerConfig",
    "Network",
    "NoCallable",
    "RateLimit",
    "RedisConfig",
    "RetentionConfig",
    "ScheduleConfig",
    "ServerConfig",
    "SigningSecret",
    "TargetError",
    "TracingConfig",
    "WorkersConfig",
    "load",
    "parse",
    "redact",
    "redact_postgres",
    "resolve",
]
