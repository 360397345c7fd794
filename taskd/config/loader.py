"""Loading a config: the TOML file read, every table checked, one Config or one ConfigError."""

from __future__ import annotations

import os
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taskd.config.autoscale import read_autoscale
from taskd.config.handlers import read_handlers
from taskd.config.model import (
    ArchiveConfig,
    AutoscaleConfig,
    CallbacksConfig,
    Config,
    RedisConfig,
    RetentionConfig,
    ServerConfig,
    TracingConfig,
    WorkersConfig,
)
from taskd.config.schedules import read_schedules
from taskd.config.sections import (
    read_archive,
    read_callbacks,
    read_redis,
    read_retention,
    read_server,
    read_workers,
)
from taskd.config.tables import ConfigError, Table
from taskd.config.targets import add_import_dirs
from taskd.config.tracing import read_tracing

# The top-level tables, in the order messages list them (Config's fields have another).
TOP_KEYS = (
    "server", "redis", "workers", "retention", "callbacks", "archive", "autoscale", "handlers",
    "schedules", "tracing",
)  # fmt: skip


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file; raise ConfigError listing every problem.

    The file's directory goes first on Python's import path, so that python handlers in
    a package beside it import as they would for `python` run there.
    """
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
    return parse(data, source=source, env=env, directory=Path(source).parent.absolute())


def parse(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate already-parsed TOML data; raise ConfigError listing every problem.

    Python handlers are imported here, to refuse a typo at start: first `directory` (the
    config file's, if any) and then [workers] python_path (relative to `directory`, else
    to the working directory) go in front of Python's import path, for good, since a
    handler's module may import others when it runs.
    """
    env = os.environ if env is None else env
    base = Path(directory) if directory is not None else Path.cwd()
    problems: list[str] = []
    root = Table(data, "", problems, known=TOP_KEYS)
    secrets = env.get("TASKD_SIGNING_SECRETS", "")
    server = read_server(root.table("server", schema=ServerConfig), secrets)
    redis_url = env.get("TASKD_REDIS_URL", "")
    redis = read_redis(root.table("redis", schema=RedisConfig), redis_url)
    workers = read_workers(root.table("workers", schema=WorkersConfig), base)
    retention = read_retention(root.table("retention", schema=RetentionConfig))
    callbacks = read_callbacks(root.table("callbacks", schema=CallbacksConfig))
    archive_url = env.get("TASKD_ARCHIVE_URL", "")
    archive = read_archive(root.table("archive", schema=ArchiveConfig), archive_url)
    autoscale = read_autoscale(root.table("autoscale", schema=AutoscaleConfig))
    tracing_table = root.table("tracing", schema=TracingConfig)
    tracing = read_tracing(tracing_table, env, present="tracing" in data)
    own = [Path(directory)] if directory is not None else []
    add_import_dirs([*own, *workers.python_path])
    handlers = read_handlers(root)
    schedules = read_schedules(root, handlers)
    if problems:
        raise ConfigError(source, problems)
    return Config(
        server=server,
        redis=redis,
        workers=workers,
        handlers=types.MappingProxyType(handlers),
        retention=retention,
        schedules=schedules,
        source=source,
        callbacks=callbacks,
        archive=archive,
        autoscale=autoscale,
        tracing=tracing,
    )
